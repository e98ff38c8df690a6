"""A stand-in for flash-attn 2.8 in tests: `flash_attn_varlen_func` and `flash_attn_with_kvcache` over a paged KV
cache, computed with plain torch.

flash-attn ships no binary wheel we can install and cannot be built without a GPU, so kvgate's flash_attn backend
is tested against this module. It follows the documented contract (the docstrings of flash_attn_interface.py and
the checks of csrc/flash_attn/flash_api.cpp) for the arguments kvgate passes, and asserts it; arguments kvgate
does not pass are not accepted, so a plumbing mistake fails loudly. Unlike the real kernels it also accepts fp32
and CPU tensors. It is written independently of engine/layers/attention_torch.py: comparing the two then tests
kvgate's plumbing rather than the same code twice.
"""

from __future__ import annotations

import torch

__version__ = "2.8.3+standin"

PAGE_MULTIPLE = 256  # flash_api.cpp: "Paged KV cache block size must be divisible by 256"


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           softmax_scale=None, causal=False, block_table=None):
    """q (total_q, nheads, headdim); k, v (num_blocks, page_block_size, nheads_k, headdim) with block_table
    (batch_size, max_num_blocks_per_seq) int32; cu_seqlens_q/k (batch_size + 1,) int32. Returns (total_q, nheads,
    headdim). Only the paged form is implemented: it is the only one kvgate uses."""
    assert block_table is not None, "stand-in: only the paged form (block_table=...) is implemented"
    _check_paged(q, k, v, block_table)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        assert cu.dtype == torch.int32, f"{name} must have dtype int32"
        assert cu.is_contiguous() and cu.device == q.device, f"{name} must be contiguous, on q's device"
    batch = cu_seqlens_q.numel() - 1
    assert batch > 0, "batch size must be positive"
    assert q.dim() == 3, "q must be (total_q, nheads, headdim)"
    assert cu_seqlens_k.shape == (batch + 1,), "cu_seqlens_k must have shape (batch_size + 1,)"
    assert block_table.shape[0] == batch, "block_table must have shape (batch_size, max_num_blocks_per_seq)"
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert starts_q[0] == 0 and starts_q[-1] == q.shape[0], "cu_seqlens_q must span q's rows"
    lens_q = [b - a for a, b in zip(starts_q, starts_q[1:])]
    lens_k = [b - a for a, b in zip(starts_k, starts_k[1:])]
    assert min(lens_q) >= 0 and min(lens_k) >= 0, "cu_seqlens must be non-decreasing"
    # the kernel sizes its grid from these: too small and rows or keys are silently skipped
    assert max(lens_q) <= max_seqlen_q, f"max_seqlen_q {max_seqlen_q} < longest query {max(lens_q)}"
    assert max(lens_k) <= max_seqlen_k, f"max_seqlen_k {max_seqlen_k} < longest context {max(lens_k)}"
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.empty_like(q)
    for b in range(batch):
        rows = slice(starts_q[b], starts_q[b + 1])
        out[rows] = _attend(q[rows], k, v, block_table[b], lens_k[b], scale, causal)
    return out


def flash_attn_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, block_table, softmax_scale=None, causal=False):
    """q (batch_size, seqlen, nheads, headdim); k_cache, v_cache (num_blocks, page_block_size, nheads_k, headdim)
    with block_table (batch_size, max_num_blocks_per_seq) int32; cache_seqlens (batch_size,) int32: how many
    cached tokens each sequence attends over. Returns (batch_size, seqlen, nheads, headdim). Only the paged form
    without new k/v (kvgate writes the cache itself) is implemented."""
    _check_paged(q, k_cache, v_cache, block_table)
    assert q.dim() == 4, "q must be (batch_size, seqlen, nheads, headdim)"
    batch = q.shape[0]
    assert batch > 0, "batch size must be positive"
    assert isinstance(cache_seqlens, torch.Tensor), "stand-in: cache_seqlens must be a tensor"
    assert cache_seqlens.dtype == torch.int32, "seqlens_k must have dtype int32"
    assert cache_seqlens.is_contiguous() and cache_seqlens.shape == (batch,), "cache_seqlens: (batch_size,)"
    assert block_table.shape[0] == batch, "block_table must have shape (batch_size, max_num_blocks_per_seq)"
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    lens = cache_seqlens.tolist()
    return torch.stack([_attend(q[b], k_cache, v_cache, block_table[b], lens[b], scale, causal)
                        for b in range(batch)])


def _check_paged(q, k_cache, v_cache, block_table) -> None:
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), "fp16 and bf16 only (stand-in: and fp32)"
    assert k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, "q, k and v must have the same dtype"
    assert k_cache.device == q.device and v_cache.device == q.device and block_table.device == q.device
    for name, t in (("q", q), ("k", k_cache), ("v", v_cache)):
        assert t.stride(-1) == 1, f"{name} must have contiguous last dimension"
    assert k_cache.dim() == 4 and v_cache.shape == k_cache.shape, \
        "paged k/v must be (num_blocks, page_block_size, nheads_k, headdim)"
    _, page, heads_k, head_dim = k_cache.shape
    assert page % PAGE_MULTIPLE == 0, f"Paged KV cache block size must be divisible by {PAGE_MULTIPLE}"
    assert q.shape[-1] == head_dim and head_dim <= 256, "headdim must match the cache's and be at most 256"
    assert q.shape[-2] % heads_k == 0, "Number of heads in key/value must divide number of heads in query"
    assert block_table.dtype == torch.int32, "block_table must have dtype torch.int32"
    assert block_table.dim() == 2 and block_table.stride(-1) == 1, "block_table must have contiguous last dimension"


def _attend(q, k_cache, v_cache, table, seqlen_k: int, scale: float, causal: bool):
    """One sequence: q (seqlen_q, nheads, headdim) against its first seqlen_k cached tokens."""
    num_blocks, page, heads_k, head_dim = k_cache.shape
    used = -(-seqlen_k // page)
    assert used <= table.numel(), f"block_table has {table.numel()} blocks, the context needs {used}"
    blocks = table[:used].long()
    assert bool(((blocks >= 0) & (blocks < num_blocks)).all()), "block_table points outside the cache"
    keys = k_cache[blocks].reshape(-1, heads_k, head_dim)[:seqlen_k]
    values = v_cache[blocks].reshape(-1, heads_k, head_dim)[:seqlen_k]
    group = q.shape[1] // heads_k  # query heads g*group .. (g+1)*group-1 share key/value head g
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys.float()) * scale
    if causal:  # aligned to the bottom right: query i sees keys up to i + seqlen_k - seqlen_q
        seqlen_q = q.shape[0]
        visible = torch.arange(seqlen_k)[None, :] <= torch.arange(seqlen_q)[:, None] + (seqlen_k - seqlen_q)
        scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
    probs = scores.softmax(dim=-1).nan_to_num(0.0)  # documented: a row that sees no key outputs zeros
    return torch.einsum("hqk,khd->qhd", probs, values.float()).to(q.dtype)
