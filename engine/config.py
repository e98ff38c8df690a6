"""EngineConfig: every engine setting, validated once at construction."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.layers.attention_backends import BACKEND_NAMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ATTENTION_BACKENDS = ("auto", *BACKEND_NAMES)
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("int8", "fp8")  # weight formats (engine/layers/quantized.py); None: the checkpoint's own


@dataclass
class EngineConfig:
    model: str | None = None  # None: the embedded default (SmolLM2-135M-Instruct)
    tokenizer: str | None = None  # None: the model's own
    dtype: str = "auto"  # auto: float32 on CPU; on CUDA the checkpoint's dtype (bfloat16 if unrecorded)
    device: str = "auto"  # auto: cuda when available, else cpu
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int | None = None  # None: 16, or 256 for flash_attn (its paged kernels need it)
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # explicit KV pool size; overrides gpu_memory_utilization
    cpu_kv_cache_gib: float = 2.0  # KV pool size on CPU, where free memory is not measured
    enable_prefix_caching: bool = True
    load_format: str = "auto"
    seed: int = 0
    enforce_eager: bool = False
    async_scheduling: bool = True  # schedule and launch step N+1 while step N runs (outputs come a step later)
    attention_backend: str = "auto"
    in_process: bool = False  # run the engine core in this process (tests, debugging)
    quantization: str | None = None  # int8 (CPU: weight-only, per-channel) | fp8 (CUDA; not available yet)

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("load_format", self.load_format, LOAD_FORMATS)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.max_model_len is not None:
            _check_int("max_model_len", self.max_model_len, 1)
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if self.block_size is not None:
            _check_int("block_size", self.block_size, 8)
        if self.block_size is not None and self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 8, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None:
            _check_int("num_kv_blocks", self.num_kv_blocks, 1)
        if not self.cpu_kv_cache_gib > 0:
            raise ValueError(f"cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")
        _check_int("seed", self.seed, 0)
        if self.quantization is not None:
            _check_choice("quantization", self.quantization, QUANTIZATIONS)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "EngineConfig":
        """Load the [engine] table of a TOML preset (kvgate/default.toml lists every setting); keyword overrides
        win."""
        with open(path, "rb") as f:
            table = tomllib.load(f).get("engine", {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"unknown engine setting(s) in {path}: {', '.join(unknown)}")
        return cls(**{**table, **overrides})


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
