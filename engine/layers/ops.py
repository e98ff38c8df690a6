"""The small elementwise ops between the matmuls: RMSNorm (with the residual add), rotary embedding, SiLU-and-mul.

Each is a handful of memory-bound kernels in eager PyTorch. The model runner chooses one `Ops` at start and
hands it to the model and the attention backend: `Ops.eager()`, or on CUDA unless enforce_eager `Ops.compiled()`,
torch.compile'd versions (each one fused kernel) and our Triton kernel for silu_and_mul. (With the triton
attention backend, rotary and the q/k norm run in its fused rope-and-store kernel instead.)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32, as the reference implementations do."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(norm(x + residual), x + residual)."""
    x = x + residual
    return rms_norm(x, weight, eps), x


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; neox-style rotation (halves), as HF Llama."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def norm_rotary(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor):
    """Qwen3's per-head q/k norm, then the rotation."""
    return rotary(rms_norm(x, weight, eps), cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable = rms_norm
    add_rms_norm: Callable = add_rms_norm
    rotary: Callable = rotary
    norm_rotary: Callable = norm_rotary
    silu_and_mul: Callable = silu_and_mul

    @classmethod
    def eager(cls) -> Ops:
        return cls()

    @classmethod
    def compiled(cls) -> Ops:
        eager = cls()
        fns = {f.name: torch.compile(getattr(eager, f.name), dynamic=True, fullgraph=True) for f in fields(cls)}
        try:  # compiled, silu_and_mul ran at a third of memory bandwidth on large inputs; ours is exact and at it
            from engine.kernels.activation import silu_and_mul as triton_silu_and_mul
        except ImportError:  # pragma: no cover
            pass
        else:
            fns["silu_and_mul"] = triton_silu_and_mul
        return cls(**fns)
