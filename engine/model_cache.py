"""kvgate's cache directory (converted GGUF files, shape presets' config and tokenizer directories): where it is,
and how a directory in it is built once."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    return Path(os.environ.get("KVGATE_CACHE_DIR") or Path.home() / ".cache" / "kvgate")


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Make the cache directory `target` once, with build(tmp_dir), and return it. The finished directory
    appears in one os.replace, so its existence means it is complete; a lock keeps two processes from building
    it at once."""
    from filelock import FileLock

    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
