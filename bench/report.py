"""The `kvgate bench offline --output` document: a header saying where and how the results were taken, then the
results, so a figure never travels without its device, versions and engine settings."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import sys
import time

from engine.config import EngineConfig


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def header(config: EngineConfig) -> dict:
    return {
        "device": device_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("torch", "transformers", "triton", "tokenizers")},
        "engine_config": dataclasses.asdict(config),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_report(path: str, head: dict, results: list[dict]) -> None:
    """Write the whole document again (atomic replace): a run cut short still leaves every finished result."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"header": head, "results": results}, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
