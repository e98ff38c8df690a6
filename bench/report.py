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
from pathlib import Path

from engine.config import EngineConfig


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def memory_read_tb_s() -> float | None:
    """The GPU's memory read bandwidth as a reduction over 2 GiB sees it (best of 6 runs), or None without CUDA.
    Instances of one GPU kind differ by several percent here, and bandwidth-bound figures (bs1) with them."""
    import torch

    if not torch.cuda.is_available():
        return None
    x = torch.ones(2**29, dtype=torch.float32, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(6):  # the first is a warm-up
        start.record()
        x.sum()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del x
    torch.cuda.empty_cache()
    return round(2**31 / best / 1e12, 3)


def header(config: EngineConfig) -> dict:
    return {
        "device": device_name(),
        "memory_read_tb_s": memory_read_tb_s(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("torch", "transformers", "triton", "tokenizers")},
        "engine_config": dataclasses.asdict(config),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path, doc: dict) -> Path:
    """Write a result document whole, atomically (a temporary file, then one rename): a run cut short leaves the
    last complete document, and a reader never sees half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_report(path: str, head: dict, results: list[dict]) -> None:
    """`bench offline --output`: rewritten after each result, so a run cut short still leaves every finished one."""
    write_json(path, {"header": head, "results": results})


def figure_text(value) -> str:
    """A figure as the terminal tables print it: three significant digits, whole numbers from 100 up."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
