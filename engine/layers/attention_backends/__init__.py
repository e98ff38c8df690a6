"""Attention backends by name. This module only names them (config validation reads BACKEND_NAMES without
importing torch); `create_backend` imports the chosen one.

`torch` is the reference every other backend is tested against; `auto` takes flash_attn on CUDA when it is
installed and computes in the model's dtype, else triton on CUDA, else torch.
"""

from __future__ import annotations

import importlib

_CLASSES = {
    "torch": "engine.layers.attention_backends.torch_backend:TorchAttentionBackend",
    "triton": "engine.layers.attention_backends.triton_backend:TritonAttentionBackend",
    "flash_attn": "engine.layers.attention_backends.flash_backend:FlashAttentionBackend",
}
BACKEND_NAMES = tuple(_CLASSES)
_AUTO_ON_CUDA = ("flash_attn", "triton")  # in order of preference


def backend_class(name: str):
    """The class of the backend called `name` (imported now)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown attention backend {name!r}; available: auto, {', '.join(BACKEND_NAMES)}")
    module, cls = _CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_backend(name: str, device, dtype, ops):
    """The backend `name` (or the one `auto` picks for this device and dtype), given the runner's ops."""
    if name == "auto":
        candidates = [backend_class(n) for n in _AUTO_ON_CUDA] if device.type == "cuda" else []
        cls = next((c for c in candidates if c.is_available() and dtype in c.dtypes), backend_class("torch"))
    else:
        cls = backend_class(name)
        if dtype not in cls.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in cls.dtypes)
            raise ValueError(f"attention_backend {name!r} computes in {names}, not {str(dtype).removeprefix('torch.')}"
                             f"; choose another dtype or attention backend")
    return cls(ops)
