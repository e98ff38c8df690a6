"""The attention block's prologue in one launch: from the packed qkv projection, Qwen3's per-head q/k RMSNorm
(optional), the neox rotary embedding of q and k, and the store of the rotated k and the untouched v into the
paged KV cache ([num_blocks, block_size, kv_heads, head_dim]); returns the rotated q. Eagerly these are 2-3
kernels (norm_rotary or rotary, then store_kv), each reading and writing q/k in full.

One program per token holds all its q heads as one [BLOCK_H, HEAD_DIM] tile and all its kv heads as another.
The rotation partner of column d is column (d + D/2) % D, negated for d < D/2: the tile is loaded a second time
at the partner columns (L1 hits) rather than shuffled. Every intermediate torch rounds to the model dtype is
rounded here too, so under Triton's interpreter the result equals eager torch bit for bit. Compiled for the GPU it
can differ by one bf16 rounding: ptxas contracts round(x * cos) + rot * sin into one bf16 FMA (rounding once
where eager rounds twice; turning contraction off measured no better and possibly slower), and torch and Triton
add the q/k norm's squares in different orders. Padding tokens (slot < 0) still get their q but write nothing,
so padded CUDA-graph batches leave the cache untouched. Reads no tensor values on the host."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.activation import INTERPRET, round_to


@triton.jit
def _norm_rope(row, stride_h, stride_d, heads, cos, sin, weight, eps, N: tl.constexpr, BLOCK_H: tl.constexpr,
               HEAD_DIM: tl.constexpr, NORM: tl.constexpr, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """rotary(rms_norm(x)) of heads [0, N) at row, as ops.rotary(ops.rms_norm(...)) rounds it."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HEAD_DIM)
    partner = (d + HEAD_DIM // 2) % HEAD_DIM
    mask = h < N
    x = tl.load(row + (heads + h) * stride_h + d[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(row + (heads + h) * stride_h + partner[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    if NORM:  # rms in fp32, rounded to dtype, then weight * it (opmath fp32, rounded)
        r = tl.math.rsqrt(tl.sum(x * x, 1) * (1.0 / HEAD_DIM) + eps)[:, None]
        w, wp = tl.load(weight + d).to(tl.float32), tl.load(weight + partner).to(tl.float32)
        x = round_to(w[None, :] * round_to(x * r, dtype, INTERPRET).to(tl.float32), dtype, INTERPRET).to(tl.float32)
        xp = round_to(wp[None, :] * round_to(xp * r, dtype, INTERPRET).to(tl.float32), dtype, INTERPRET).to(tl.float32)
    rot = tl.where(d < HEAD_DIM // 2, -xp, xp)
    # x * cos and rotate_half(x) * sin are each rounded before the sum, as eager torch does
    xc = round_to(x * cos[None, :], dtype, INTERPRET).to(tl.float32)
    rs = round_to(rot * sin[None, :], dtype, INTERPRET).to(tl.float32)
    return round_to(xc + rs, dtype, INTERPRET), h, mask


@triton.jit
def _rope_store_kernel(
    qkv, cos, sin, q_norm, k_norm, q_out, k_cache, v_cache, slot_mapping, eps,
    stride_t, stride_h, stride_d, stride_ct, stride_cd, stride_st, stride_sd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd, stride_vcb, stride_vcs, stride_vch, stride_vcd,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, NORM: tl.constexpr, INTERPRET: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dtype = q_out.dtype.element_ty
    d = tl.arange(0, HEAD_DIM)
    cos_t = tl.load(cos + token * stride_ct + d * stride_cd).to(tl.float32)
    sin_t = tl.load(sin + token * stride_st + d * stride_sd).to(tl.float32)
    row = qkv + token * stride_t
    q, h, mask = _norm_rope(row, stride_h, stride_d, 0, cos_t, sin_t, q_norm, eps, HEADS, BLOCK_H, HEAD_DIM,
                          NORM, dtype, INTERPRET)
    tl.store(q_out + token * (HEADS * HEAD_DIM) + h * HEAD_DIM + d[None, :], q, mask=mask)
    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot >= 0:
        # names of their own: compiled Triton wants a variable's type unchanged across the branch
        k, kv_h, kv_mask = _norm_rope(row, stride_h, stride_d, HEADS, cos_t, sin_t, k_norm, eps, KV_HEADS, BLOCK_KV,
                                      HEAD_DIM, NORM, dtype, INTERPRET)
        v = tl.load(row + (HEADS + KV_HEADS + kv_h) * stride_h + d[None, :] * stride_d, mask=kv_mask)
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        tl.store(k_cache + block * stride_kcb + offset * stride_kcs + kv_h * stride_kch + d[None, :] * stride_kcd,
                 k, mask=kv_mask)
        tl.store(v_cache + block * stride_vcb + offset * stride_vcs + kv_h * stride_vch + d[None, :] * stride_vcd,
                 v, mask=kv_mask)



def _check_rope(name: str, t: torch.Tensor, tokens: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """cos/sin as [T, 1, D] or [T, D] in the model dtype; returns the [T, D] view."""
    if tuple(t.shape) not in ((tokens, 1, head_dim), (tokens, head_dim)) or t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} [T, 1, D] or [T, D] with T={tokens}, D={head_dim}, "
                         f"got {t.dtype} {tuple(t.shape)}")
    return t if t.dim() == 2 else t[:, 0]


def rope_store_kv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                  q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """qkv [T, num_heads + 2 * num_kv_heads, D] (q, k, v heads; any strides) -> rotated q [T, num_heads, D]
    (contiguous); rotated k and v go to the caches at slot_mapping[t] (int64; block * block_size + offset; < 0:
    nothing written). With norm weights ([D], both or neither), q and k are RMS-normed first. What rms_norm /
    rotary / store_kv do eagerly, to within one bf16 rounding (see the module docstring)."""
    if qkv.dim() != 3 or num_heads < 1 or num_kv_heads < 1 or qkv.shape[1] != num_heads + 2 * num_kv_heads:
        raise ValueError(f"qkv must be [T, num_heads + 2 * num_kv_heads, D] with num_heads={num_heads}, "
                         f"num_kv_heads={num_kv_heads}, got {tuple(qkv.shape)}")
    tokens, _, head_dim = qkv.shape
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"qkv's head_dim must be a power of two, got {head_dim}")
    cos = _check_rope("cos", cos, tokens, head_dim, qkv.dtype)
    sin = _check_rope("sin", sin, tokens, head_dim, qkv.dtype)
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight must both be given or both be None")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None and tuple(w.shape) != (head_dim,):
            raise ValueError(f"{name} must be [{head_dim}], got {tuple(w.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or tuple(cache.shape[2:]) != (num_kv_heads, head_dim) or cache.dtype != qkv.dtype:
            raise ValueError(f"{name} must be {qkv.dtype} [num_blocks, block_size, {num_kv_heads}, {head_dim}], "
                             f"got {cache.dtype} {tuple(cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if tuple(slot_mapping.shape) != (tokens,):
        raise ValueError(f"slot_mapping must be [{tokens}], got {tuple(slot_mapping.shape)}")
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    norm = q_norm_weight is not None
    block_h, block_kv = triton.next_power_of_2(num_heads), triton.next_power_of_2(num_kv_heads)
    _rope_store_kernel[(tokens,)](
        qkv, cos, sin, q_norm_weight if norm else cos, k_norm_weight if norm else cos, q, k_cache, v_cache,
        slot_mapping, eps, *qkv.stride(), *cos.stride(), *sin.stride(), *k_cache.stride(), *v_cache.stride(),
        HEADS=num_heads, KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_KV=block_kv,
        BLOCK_SIZE=k_cache.shape[1], NORM=norm, INTERPRET=INTERPRET,
        num_warps=max(1, min(8, block_h * head_dim // 256)),
    )
    return q
