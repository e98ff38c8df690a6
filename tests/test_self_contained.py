"""The repository is self-contained: no file in it points at a document outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the parent directory's shared folder, and the project notes that live there (written in two parts, so that this
# file does not match itself)
OUTSIDE = re.compile(r"\.\./" r"shared|\b(BENCHMARKS|ENVIRONMENT|DESIGN)" r"\.md\b")


def text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return [ROOT / name for name in listed if name and (ROOT / name).is_file()]


def test_no_file_refers_outside_the_repository():
    hits = []
    for path in text_files():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:  # not text
            continue
        hits += [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for n, line in enumerate(lines, 1)
                 if OUTSIDE.search(line)]
    assert not hits, "references to files outside the repository (move what a user needs into docs/):\n" + \
        "\n".join(hits)
