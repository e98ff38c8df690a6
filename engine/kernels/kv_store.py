"""Write new tokens' K/V into the paged cache ([num_blocks, block_size, kv_heads, head_dim]), one program per
token. Padding rows (slot < 0) write nothing, so padded CUDA-graph batches leave the cache untouched."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k, v, k_cache, v_cache, slot_mapping,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd, stride_vcb, stride_vcs, stride_vch, stride_vcd,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping + token).to(tl.int64)
    if slot < 0:
        return
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < KV_HEADS) & (d < HEAD_DIM)
    row_k = tl.load(k + token * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    row_v = tl.load(v + token * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    tl.store(k_cache + block * stride_kcb + offset * stride_kcs + h * stride_kch + d * stride_kcd, row_k, mask=mask)
    tl.store(v_cache + block * stride_vcb + offset * stride_vcs + h * stride_vch + d * stride_vcd, row_v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [T, KVH, D] (any strides) into slot_mapping[t] (int64; block_id * block_size + offset)."""
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_h, block_d = triton.next_power_of_2(kv_heads), triton.next_power_of_2(head_dim)
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_SIZE=k_cache.shape[1],
        num_warps=max(1, min(4, block_h * block_d // 256)),
    )
