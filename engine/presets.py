"""Shape presets: engine/model_presets/NAME.toml (package data) holds the config.json of a real model (its
`[model]` table) and no weights, for benchmarks with random weights of real shapes:
`--model qwen3-0.6b --load-format dummy`. Any other .toml file of that form can be named by its path.
engine/model_source.py turns a preset into a model directory.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESETS_DIR = Path(__file__).with_name("model_presets")  # shipped in the wheel: see pyproject.toml
_NAME = re.compile(r"[\w.-]+")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def preset_file(model: str) -> Path | None:
    """The preset `model` names: a path to a .toml file, or the name of a shipped preset; else None."""
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
