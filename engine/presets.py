"""Shape presets: configs/models/NAME.toml holds the config.json of a real model (its `[model]` table) and no
weights, for benchmarks with random weights of real shapes: `--model qwen3-0.6b --load-format dummy`.

A preset resolves to a cache directory holding config.json written from the table, generation_config.json, and
the files of a real tokenizer: the one the user names (`tokenizer`: a directory of tokenizer files, or anything
`resolve_model` takes), else the embedded default model's. That tokenizer's vocabulary may be smaller than the
model's: prompts of token ids are checked against the model's vocabulary, and sampled ids the tokenizer does not
know decode to nothing (the Rust tokenizers library skips them), so random weights give harmless text.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

from engine.model_source import (
    ModelNotFoundError,
    _cache_root,
    build_once,
    generation_config_of,
    read_model_config,
    resolve_model,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                    "chat_template.json")
_NAME = re.compile(r"[\w.-]+")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def preset_file(model: str) -> Path | None:
    """The preset `model` names: a path to a .toml file, or the name of one in configs/models; else None."""
    path = Path(model).expanduser()
    if path.suffix == ".toml" and path.is_file():
        return path.resolve()
    named = PRESETS_DIR / f"{model}.toml"
    return named if _NAME.fullmatch(model) and named.is_file() else None


def read_preset(path: Path) -> dict:
    """The preset's [model] table: the fields of config.json."""
    with open(path, "rb") as f:
        table = tomllib.load(f).get("model")
    if not isinstance(table, dict):
        raise ValueError(f"shape preset {path} has no [model] table (the fields of the model's config.json)")
    for field in ("architectures", "model_type"):
        if field not in table:
            raise ValueError(f"shape preset {path}: [model] has no {field!r}")
    return table


def resolve_preset(path: Path, load_format: str, tokenizer: str | None = None) -> Path:
    """The cache directory of a preset (built once). Keyed by the preset's bytes and the tokenizer files' paths,
    sizes and mtimes, so an edited preset or a replaced tokenizer gives a new directory."""
    if load_format != "dummy":
        raise ModelNotFoundError(
            f"model {path.stem!r} is a shape preset ({path}): it carries no weights; pass --load-format dummy "
            f"(load_format='dummy') to run it with random weights of its shape")
    table = read_preset(path)
    files = _tokenizer_files(_tokenizer_dir(tokenizer))
    digest = hashlib.sha256(path.read_bytes())
    for f in files:
        stat = f.stat()
        digest.update(f"|{f}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    target = _cache_root() / "models" / f"preset-{path.stem}-{digest.hexdigest()[:12]}"
    return build_once(target, lambda tmp: _write(tmp, table, files))


def _tokenizer_dir(tokenizer: str | None) -> Path:
    if tokenizer is None:
        try:
            return resolve_model(None)
        except ModelNotFoundError as e:
            raise ModelNotFoundError(
                f"a shape preset takes its tokenizer from the embedded default model, which is missing ({e}); "
                f"or pass a directory of tokenizer files: --tokenizer DIR") from e
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        return resolve_model(tokenizer, "dummy")
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"tokenizer {tokenizer!r}: {e}") from e


def _tokenizer_files(directory: Path) -> list[Path]:
    files = [directory / name for name in _TOKENIZER_FILES if (directory / name).is_file()]
    if not files:
        raise ModelNotFoundError(
            f"tokenizer directory {str(directory)!r} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
            f"...)")
    return files


def _write(out: Path, table: dict, tokenizer_files: list[Path]) -> None:
    (out / "config.json").write_text(json.dumps(table, indent=2) + "\n")
    config = read_model_config(out)  # refuses an unsupported architecture before anything is cached
    generation = generation_config_of(config)
    if generation is not None:
        generation.save_pretrained(out)
    for f in tokenizer_files:
        shutil.copy(f, out / f.name)
    # The tokenizer's own length limit is its model's: raise it to this one's, or long prompts warn for nothing.
    tok_config = out / "tokenizer_config.json"
    limit = table.get("max_position_embeddings")
    if tok_config.exists() and limit:
        data = json.loads(tok_config.read_text())
        data["model_max_length"] = limit
        tok_config.write_text(json.dumps(data, indent=2) + "\n")
