"""Varlen causal attention over a paged KV cache (FlashAttention-2 style), for prefill, chunked prefill and mixed
batches. Every key (cached prefix and the new tokens, already stored) is read from the cache through the block
table, so a prefix-cache hit or a later chunk is the same case as a fresh prompt.

A program owns one KV head and BLOCK_M rows, where row r is (token r // GROUP, query head r % GROUP of that KV
head's group): the query heads sharing a KV head load each K/V tile once, and a one-token row (decode in a mixed
batch) still fills GROUP rows of the tile rather than one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def check_head_dim(head_dim: int) -> None:
    """tl.dot needs power-of-two tiles of at least 16; padding other sizes is not implemented."""
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"the triton attention backend needs a power-of-two head_dim in [16, 256], "
                         f"got {head_dim}; use --attention-backend torch or flash_attn")


def dot_precision(dtype: torch.dtype) -> str:
    """Full fp32 products for fp32 models (tf32 would drift from the reference); other dtypes ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def attend_tiles(acc, l_i, m_i, q, k_base, v_base, table_row, n_start, n_end, pos,
                 stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update over keys [n_start, n_end) of one sequence, in log2 units. MASKED (the tiles the
    causal diagonal or the context's end cut): row i sees keys <= pos[i], and keys >= n_end are never loaded;
    callers keep every stored row's pos below n_end, so the causal mask alone hides those. Unmasked: every key is
    visible to every row, and loads go unpredicated."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + offs_n
        if MASKED:
            # keys past n_end may lie past the table's end or in never-written slots (NaN garbage): never load
            valid = n < n_end
            block = tl.load(table_row + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            k_off = block * stride_kb + (n % BLOCK_SIZE) * stride_ks
            v_off = block * stride_vb + (n % BLOCK_SIZE) * stride_vs
            k = tl.load(k_base + k_off[None, :] + offs_d[:, None] * stride_kd, mask=valid[None, :], other=0.0)
            v = tl.load(v_base + v_off[:, None] + offs_d[None, :] * stride_vd, mask=valid[:, None], other=0.0)
        else:
            block = tl.load(table_row + n // BLOCK_SIZE).to(tl.int64)
            k_off = block * stride_kb + (n % BLOCK_SIZE) * stride_ks
            v_off = block * stride_vb + (n % BLOCK_SIZE) * stride_vs
            k = tl.load(k_base + k_off[None, :] + offs_d[:, None] * stride_kd)
            v = tl.load(v_base + v_off[:, None] + offs_d[None, :] * stride_vd)
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        if MASKED:
            qk = tl.where(n[None, :] <= pos[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# eager steps pass tables as wide as their widest context: no variant per table width
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    q, k_cache, v_cache, out, query_start, seq_lens, block_tables, qk_scale,
    stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, seq, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start + seq)
    q_len = tl.load(query_start + seq + 1) - q_start
    seq_len = tl.load(seq_lens + seq)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    token = rows // GROUP
    first_token = (pid_m * BLOCK_M) // GROUP
    if first_token >= q_len:  # this sequence is shorter than the batch's longest
        return
    last_token = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
    head = kv_head * GROUP + rows % GROUP
    row_ok = token < q_len
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + token).to(tl.int64)
    q_tile = tl.load(q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                     mask=row_ok[:, None], other=0.0)
    # query token j of this sequence sits at position seq_len - q_len + j and sees keys 0..that position
    pos = seq_len - q_len + token
    table_row = block_tables + seq.to(tl.int64) * stride_bt
    k_base = k_cache + kv_head * stride_kh
    v_base = v_cache + kv_head * stride_vh
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: even a fully masked first tile gives p = 0
    # key tiles every row of this block sees in full, then the tiles the causal diagonal cuts; none past it
    full_end = (seq_len - q_len + first_token + 1) // BLOCK_N * BLOCK_N
    kv_end = seq_len - q_len + last_token + 1
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q_tile, k_base, v_base, table_row, 0, full_end, pos,
                                 stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
                                 HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, PRECISION)
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q_tile, k_base, v_base, table_row, full_end, kv_end, pos,
                                 stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
                                 HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, PRECISION)
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows with no keys (seq_len 0 padding) come out zero
    o_rows = (q_start + token).to(tl.int64)
    tl.store(out + o_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od, acc,
             mask=row_ok[:, None])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                            query_start: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            max_query_len: int, scale: float, block_m: int | None = None,
                            block_n: int | None = None) -> None:
    """out[T, H, D] = causal attention of q[T, H, D] (any strides) over each sequence's cached context.
    max_query_len is the host-side max of query_start's differences (sizes the grid). block_m/block_n override
    the tile sizes (tests use small ones to cover many tiles with short sequences)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    check_head_dim(head_dim)
    if q.shape[0] == 0 or max_query_len == 0:
        return
    group = num_heads // num_kv_heads
    rows = max_query_len * group
    # short blocks when every sequence is short (decode-heavy mixed batches): less padding per program
    block_m = block_m or (64 if rows <= 64 else 128)
    block_n = block_n or 64
    num_warps = 8 if block_m * head_dim >= 128 * 128 else 4
    # 128x128 tiles in 8 warps: 2 stages beat 3 by 4% on an 8k-token Llama prompt (H200 sweep)
    num_stages = 2 if num_warps == 8 else 3
    grid = (triton.cdiv(rows, block_m), seq_lens.shape[0], num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, query_start, seq_lens, block_tables, scale * LOG2E,
        *q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
