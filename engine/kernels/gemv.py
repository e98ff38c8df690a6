"""y = x @ W.T (+ bias) for a single row x: the shape of every matmul in a batch-1 decode step (and, in
`gemv_rows`, for a few rows: a small-batch decode step).

At one row a matmul is a pass over the weights, bound by memory bandwidth. cuBLAS picks split-K kernels for
some of these shapes (Llama-3.1-8B's o_proj and down_proj), each followed by a reduction kernel; this kernel reads
each weight row once with wide loads and no second pass. On an H200 it took Llama-3.1-8B's batch-1 step from
4.74 to 4.56 ms against cuBLAS, and `gemv_config`'s wider tiles about 8% more (docs/benchmarks.md).

A program owns BLOCK_N output rows and walks K in BLOCK_K steps, keeping [BLOCK_N, BLOCK_K] fp32 partial sums
reduced once at the end. Folding the RMSNorm or SiLU before it into the loop was tried twice and measured slower
than the separate kernels: anything added to the loop slows the weight stream more than a launch costs (the
RMSNorm's sum of squares alone added 1.2 us to Llama's 15 us qkv GEMV, its weight 1.4 us more). So was
launching it as a programmatic dependent launch (prefetching its first weight tile before griddepcontrol.wait):
0.13 ms faster over a chain of GEMVs alone, 0.07 ms slower a step in the engine, where the kernels before each
GEMV (RMSNorm, attention, SiLU) do not trigger their dependents early.

FP8 weights (float8_e4m3fn, one float32 scale per output row) take the same kernel with HAS_SCALE: the tiles are
converted to fp32 as they are loaded, as bf16 ones are, and a row's scale multiplies its sum once, after the K
loop; the activation stays in its own dtype (weight-only dequantization: at one row the weight stream is the whole
cost, and halving its bytes is the whole gain). With HAS_SCALE off the compiled kernel is the bf16 one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.activation import INTERPRET, silu_and_mul, silu_mul


@triton.jit
def _gemv_kernel(x, w, bias, y, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN: tl.constexpr, SWIGLU: tl.constexpr, INTERPRET: tl.constexpr,
                 scale=None, HAS_SCALE: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptr = w + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if SWIGLU:  # the same rows of the up half, N rows further
        up_ptr = w_ptr + N * stride_wn
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN:  # the common case: no predicates on the weight stream
            xk = tl.load(x + k0 + offs_k).to(tl.float32)[None, :]
            acc += tl.load(w_ptr + k0).to(tl.float32) * xk
            if SWIGLU:
                acc_up += tl.load(up_ptr + k0).to(tl.float32) * xk
        else:
            k_ok = k0 + offs_k < K
            tile = tl.load(w_ptr + k0, mask=(rows < N)[:, None] & k_ok[None, :], other=0.0)
            acc += tile.to(tl.float32) * tl.load(x + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    dtype = y.dtype.element_ty
    out = tl.sum(acc, 1)
    if HAS_SCALE:  # one multiply per row (the up half's scales follow the gate half's, N rows further)
        out *= tl.load(scale + rows, mask=rows < N, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias + rows, mask=rows < N, other=0.0).to(tl.float32)
    if SWIGLU:  # gate and up rounded as the unfused GEMV stores them, then the activation kernel's arithmetic
        up = tl.sum(acc_up, 1)
        if HAS_SCALE:
            up *= tl.load(scale + N + rows)
        out = silu_mul(out.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32), dtype, INTERPRET)
    tl.store(y + rows, out.to(dtype), mask=rows < N)


def gemv_config(k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for a weight with k columns. Each K step of a program waits on its loads, so bandwidth
    comes from many programs in flight, each loading a wide tile: 4 rows, the widest of 2048/1024/512/256 that
    divides k. From sweeps at Llama-3.1-8B's and Qwen3-0.6B's shapes on an H200 in CUDA graphs, against the
    earlier 4-16 rows and 256-512-wide steps: Llama's batch-1 step 4.50 → 4.20 ms with 2-4 rows and 1024-wide
    steps, then 4.28 → 4.22 ms (another machine) with 4 rows and 2048-wide ones (docs/benchmarks.md). A single
    4096-wide step was slower: nothing overlaps its loads."""
    return 4, next((b for b in (2048, 1024, 512) if k % b == 0), 256)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] (contiguous), weight [N, K] (rows contiguous), bias [N] or None -> [1, N] in x's dtype.
    weight_scale [N] float32 (FP8 weights): row n's sum is multiplied by weight_scale[n] before the bias."""
    if x.dim() != 2 or x.shape[0] != 1 or not x.is_contiguous():
        raise ValueError(f"x must be one contiguous row [1, K], got shape {tuple(x.shape)}")
    k = x.shape[1]
    n = _check_operands(weight, k, bias, weight_scale)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_n, block_k = gemv_config(k)
    scaled = {} if weight_scale is None else {"scale": weight_scale, "HAS_SCALE": True}
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y, n, k, weight.stride(0), HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN=n % block_n == 0 and k % block_k == 0, SWIGLU=False,
        INTERPRET=INTERPRET, num_warps=4, num_stages=1, **scaled,
    )
    return y


def _check_operands(weight: torch.Tensor, k: int, bias, weight_scale) -> int:
    """weight [N, k] with contiguous rows, bias [N] or None, weight_scale as _check_scale says: N."""
    n = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {k}] with contiguous rows, got {tuple(weight.shape)} "
                         f"strides {weight.stride()}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    _check_scale(weight_scale, n)
    return n


def _check_scale(weight_scale: torch.Tensor | None, n: int) -> None:
    if weight_scale is not None and (weight_scale.shape != (n,) or weight_scale.dtype != torch.float32
                                     or not weight_scale.is_contiguous()):
        raise ValueError(f"weight_scale must be contiguous float32 of shape ({n},), got {weight_scale.dtype} "
                         f"{tuple(weight_scale.shape)}")


def gemv_swiglu(x: torch.Tensor, gate_up: torch.Tensor, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for one row x [1, K] and gate_up [2I, K] (gate rows, then up rows): the
    gate-up GEMV and the SwiGLU activation in one kernel, each program taking the same rows of both halves, so
    the activation costs no launch of its own. Bit for bit silu_and_mul(gemv(x, gate_up)): both take the same K
    steps. weight_scale [2I] float32 for FP8 gate_up (gate rows' scales, then up rows'), as gemv's."""
    n2, k = gate_up.shape
    inter = n2 // 2
    block_n, block_k = gemv_config(k)
    block_n //= 2  # a program reads as many weight rows as the plain GEMV's, half from each half
    if n2 % 2 or inter % block_n or k % block_k or x.shape != (1, k) or not x.is_contiguous() or gate_up.stride(1) != 1:
        return silu_and_mul(gemv(x, gate_up, weight_scale=weight_scale))
    _check_scale(weight_scale, n2)
    y = torch.empty(1, inter, dtype=x.dtype, device=x.device)
    scaled = {} if weight_scale is None else {"scale": weight_scale, "HAS_SCALE": True}
    _gemv_kernel[(inter // block_n,)](
        x, gate_up, gate_up, y, inter, k, gate_up.stride(0), HAS_BIAS=False, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN=True, SWIGLU=True, INTERPRET=INTERPRET, num_warps=4, num_stages=1, **scaled,
    )
    return y


@triton.jit
def _gemv_rows_kernel(x, w, bias, scale, y, M, N, K, stride_xm, stride_wn, HAS_BIAS: tl.constexpr,
                      HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      INTERPRET: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptr = x + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptr = w + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    dtype = y.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + offs_k < K
        xt = tl.load(x_ptr + k0, mask=(offs_m < M)[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + k0, mask=(rows < N)[:, None] & k_ok[None, :], other=0.0)
        if dtype == tl.float32 or INTERPRET:  # no tf32 for fp32; numpy's dot takes no bf16 (exact in fp32)
            acc = tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), acc, input_precision="ieee")
        else:  # the weight in x's dtype (an e4m3 value is exact in bf16 and fp16) on the tensor cores
            acc = tl.dot(xt, tl.trans(wt.to(xt.dtype)), acc)
    if HAS_SCALE:
        acc *= tl.load(scale + rows, mask=rows < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y + offs_m[:, None] * N + rows[None, :], acc.to(dtype), mask=(offs_m < M)[:, None] & (rows < N)[None, :])


GEMV_ROWS_MAX = 16  # rows gemv_rows takes: one tensor-core tile of them


def gemv_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] with M <= 16 (rows contiguous) @ weight.T (+ bias) -> [M, N] in x's dtype: the few-row decode
    step. Each program owns BLOCK_N weight rows and reads them once, converted to x's dtype (FP8 ones too, their
    row scales applied at the end as in gemv), against a 16-row tile of x on the tensor cores, so a weight byte
    is read once for all M rows. Tile sizes are a first guess, to be swept on the GPU against torch._scaled_mm."""
    m, k = x.shape
    if not 1 <= m <= GEMV_ROWS_MAX or x.stride(1) != 1:
        raise ValueError(f"x must be [M <= {GEMV_ROWS_MAX}, K] with contiguous rows, got {tuple(x.shape)}")
    n = _check_operands(weight, k, bias, weight_scale)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n, block_k = 64, 128
    _gemv_rows_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, weight_scale if weight_scale is not None else weight, y,
        m, n, k, x.stride(0), weight.stride(0), HAS_BIAS=bias is not None, HAS_SCALE=weight_scale is not None,
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, INTERPRET=INTERPRET, num_warps=4, num_stages=3,
    )
    return y
