"""SwiGLU's activation, silu(gate) * up, in one Triton pass: torch.compile(dynamic=True)'s kernel for it runs at
about a third of memory bandwidth on large inputs; this plain 2-D elementwise grid (rows, column blocks) is meant
to run near it at every size. Results equal eager torch bit for bit: silu is computed in fp32 as torch does
(x / (1 + exp(-x)), libdevice's expf and an IEEE division) and rounded to the input dtype before the product."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024


@triton.jit
def round_to(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 v to dtype, to nearest even. The interpreter's fp32 -> bf16 cast truncates (and mangles subnormals):
    there, round finite v's bits by hand."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(dtype, bitcast=True)
    return v.to(dtype)


@triton.jit
def silu_mul(gate, up, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """silu(gate) * up in dtype, from fp32 gate and up holding dtype values, rounded where eager torch rounds."""
    if INTERPRET:  # no libdevice in numpy, and its fp32 exp is loose: a rounded fp64 exp matches torch's CPU silu
        e = tl.exp((-gate).to(tl.float64)).to(tl.float32)
    else:  # CUDA's expf, which torch's kernel calls; tl.exp is an approximation (ex2.approx)
        e = libdevice.exp(-gate)
    silu = round_to(tl.div_rn(gate, 1.0 + e), dtype, INTERPRET).to(tl.float32)  # F.silu's output is rounded
    return round_to(silu * up, dtype, INTERPRET)


@triton.jit
def _silu_and_mul_kernel(x, out, stride_xt, inter, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x + row * stride_xt + cols, mask=mask).to(tl.float32)
    up = tl.load(x + row * stride_xt + inter + cols, mask=mask).to(tl.float32)
    tl.store(out + row * inter + cols, silu_mul(gate, up, out.dtype.element_ty, INTERPRET), mask=mask)


# whether Triton's CPU interpreter runs these kernels (read from the environment at import): kernels that round
# with round_to pass it on
INTERPRET = isinstance(round_to, InterpretedFunction)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, 2 * I] (gate then up halves, last dim contiguous, any row stride) -> silu(gate) * up, [T, I] contiguous."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be 2-D [T, 2 * I], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"x needs a contiguous last dim, got strides {x.stride()}")
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    elif out.shape != (num_tokens, inter) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape ({num_tokens}, {inter}) on {x.device}, "
                         f"got {out.dtype} {tuple(out.shape)} strides {out.stride()} on {out.device}")
    if out.numel() == 0:
        return out
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, BLOCK))](
        x, out, x.stride(0), inter, BLOCK=BLOCK, INTERPRET=INTERPRET, num_warps=4,
    )
    return out
