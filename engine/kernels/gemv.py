"""y = x @ W.T (+ bias) for a single row x: the shape of every matmul in a batch-1 decode step, optionally with the
op before it folded in.

At one row a matmul is a pass over the weights, bound by memory bandwidth. cuBLAS picks split-K kernels for
some of these shapes (Llama-3.1-8B's o_proj and down_proj), each followed by a reduction kernel; this kernel reads
each weight row once with wide loads and no second pass, and in a CUDA graph over the 32 layers' projections took
3.48 ms per token against cuBLAS's 3.72 on an H200 (docs/benchmarks.md).

A program owns BLOCK_N output rows and walks K in BLOCK_K steps, keeping [BLOCK_N, BLOCK_K] fp32 partial sums
reduced once at the end. Every program reads all of x anyway, so the small op that produces x costs nothing extra
inside the loop and saves its own launch (a few microseconds each, 64-96 times a token):
- `norm`: x is RMSNorm(x + residual) with weight g. The loop sums W·(g ⊙ h) and h² (h = x + residual, rounded
  as torch rounds it); the 1/rms factor is a scalar per row, applied at the end. Program 0 writes h out as the
  next residual. Only the rounding of the normalized input differs from the unfused ops.
- `silu`: x is [1, 2K], gate then up; the loop uses silu(gate) * up, rounded exactly as the eager op rounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PLAIN, NORM, SILU = 0, 1, 2


@triton.jit
def _gemv_kernel(x, w, bias, y, residual, residual_out, norm_weight, eps, N, K, stride_wn,
                 PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptr = w + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    dtype = y.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        xk = tl.load(x + k, mask=k_ok, other=0.0)
        if PROLOGUE == 1:
            if HAS_RESIDUAL:
                xk = (xk.to(tl.float32) + tl.load(residual + k, mask=k_ok, other=0.0).to(tl.float32)).to(dtype)
                if pid == 0:
                    tl.store(residual_out + k, xk, mask=k_ok)
            xf = xk.to(tl.float32)
            squares += xf * xf
            xf = xf * tl.load(norm_weight + k, mask=k_ok, other=0.0).to(tl.float32)
        elif PROLOGUE == 2:
            gate = xk.to(tl.float32)
            up = tl.load(x + K + k, mask=k_ok, other=0.0).to(tl.float32)
            xf = ((gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up).to(dtype).to(tl.float32)
        else:
            xf = xk.to(tl.float32)
        if EVEN:  # the common case: no predicates on the weight stream
            tile = tl.load(w_ptr + k0)
        else:
            tile = tl.load(w_ptr + k0, mask=(rows < N)[:, None] & k_ok[None, :], other=0.0)
        acc += tile.to(tl.float32) * xf[None, :]
    out = tl.sum(acc, 1)
    if PROLOGUE == 1:
        out = out * tl.rsqrt(tl.sum(squares, 0) / K + eps)
    if HAS_BIAS:
        out += tl.load(bias + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(y + rows, out.to(dtype), mask=rows < N)


def gemv_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_stages), from a sweep over Llama-3.1-8B's shapes on an H200 in CUDA graphs: few rows
    per program while that still gives several waves of programs, wide K steps."""
    if n >= 16384:
        return 16, 256, 4
    return (8, 512, 4) if n > 4096 else (4, 512, 2)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         silu: bool = False):
    """x [1, K] (contiguous), weight [N, K] (rows contiguous), bias [N] or None -> [1, N] in x's dtype.

    With norm_weight: returns (weight @ RMSNorm(x + residual), x + residual), residual optional (then the
    second result is x). With silu: x is [1, 2K] and the input is silu(x[:, :K]) * x[:, K:]."""
    if x.dim() != 2 or x.shape[0] != 1 or not x.is_contiguous():
        raise ValueError(f"x must be one contiguous row [1, K], got shape {tuple(x.shape)}")
    n, k = weight.shape
    if x.shape[1] != (2 * k if silu else k) or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {x.shape[1] // 2 if silu else x.shape[1]}] with contiguous rows, "
                         f"got {tuple(weight.shape)} strides {weight.stride()}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must have shape ({k},), got {tuple(norm_weight.shape)}")
    if residual is not None and (norm_weight is None or residual.shape != x.shape or not residual.is_contiguous()):
        raise ValueError(f"residual must come with norm_weight and match x {tuple(x.shape)}, "
                         f"got {tuple(residual.shape)}")
    if silu and norm_weight is not None:
        raise ValueError("norm_weight and silu are exclusive")
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else x
    block_n, block_k, stages = gemv_config(n, k)
    prologue = NORM if norm_weight is not None else SILU if silu else PLAIN
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y, residual if residual is not None else x, residual_out,
        norm_weight if norm_weight is not None else weight, eps, n, k, weight.stride(0), PROLOGUE=prologue,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN=n % block_n == 0 and k % block_k == 0, num_warps=4, num_stages=stages,
    )
    return (y, residual_out) if prologue == NORM else y
