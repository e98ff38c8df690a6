"""Flash-decoding over a paged KV cache: one query token per sequence, each sequence's context cut into
num_splits slices attended in parallel, then merged by log-sum-exp.

The merge is a kernel of its own. Merging in the split program that finishes last (a counter per sequence and KV
head, a barrier, an acq_rel atomic) was tried: it saves the launch but put 0.09 ms on Llama-3.1-8B's batch-1 step
(4.42 vs 4.34 ms, H200), the merge then running serially at the end of the slowest split.

A program owns (sequence, KV head, split) and all query heads of that KV head's group, padded to 16 rows for
tl.dot, so each K/V tile is loaded once per group. Capturable in a CUDA graph: the grid depends only on shapes and
num_splits, and each program reads its sequence's length from seq_lens on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.prefill_attention import LOG2E, attend_tiles, check_head_dim, dot_precision

MAX_SPLITS = 16  # a batch-1 step over a few hundred tokens ran fastest at 8-16 splits (H200 sweep)
MIN_SPLIT_TOKENS = 256  # shorter slices cost more in merging than they win in parallelism


def choose_num_splits(batch: int, num_kv_heads: int, max_model_len: int, num_sms: int = 132) -> int:
    """Enough splits for about two waves of programs over the SMs, at most MAX_SPLITS and no more than the
    longest context can fill. Only a function of the batch size and static things, so a CUDA graph captured for
    a batch size keeps its split count."""
    programs = batch * num_kv_heads
    wanted = triton.cdiv(2 * num_sms, programs)
    return max(1, min(wanted, MAX_SPLITS, triton.cdiv(max_model_len, MIN_SPLIT_TOKENS)))


def decode_tiles(batch: int) -> tuple[int, int]:
    """(BLOCK_N, num_stages) for a batch size, from a CUDA-graph sweep on an H200 at Qwen3/Llama shapes
    (docs/benchmarks.md): 64-key tiles for the few short, finely split contexts of small batches, 128-key tiles
    (6-8% faster than 64) once many rows stream their caches."""
    if batch < 8:
        return 64, 2
    return (128, 2) if batch < 128 else (128, 3)


# eager steps pass tables as wide as their widest context: no variant per table width
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(
    q, k_cache, v_cache, o, lse, seq_lens, block_tables, qk_scale, num_splits,
    stride_qb, stride_qh, stride_qd, stride_ob, stride_oh, stride_os, stride_od, stride_lb, stride_lh,
    stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    if SPLIT:  # a head's split programs side by side
        seq, kv_head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    else:  # a sequence's KV heads side by side, reading its cache blocks together: 1-3% faster at batch 64-256
        kv_head, seq = tl.program_id(0), tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + seq)
    # whole tiles per split, so only the context's last tile is ragged; empty splits (start >= seq_len) and
    # padding rows (seq_len 0) loop nowhere
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    g = tl.arange(0, BLOCK_G)
    head = kv_head * GROUP + g
    offs_d = tl.arange(0, HEAD_DIM)
    q_tile = tl.load(q + seq * stride_qb + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                     mask=(g < GROUP)[:, None], other=0.0)
    pos = tl.full([BLOCK_G], seq_len - 1, dtype=tl.int32)  # the new token sees the whole context
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    k_base, v_base = k_cache + kv_head * stride_kh, v_cache + kv_head * stride_vh
    table_row = block_tables + seq * stride_bt
    # whole tiles unpredicated; only the context's last, ragged tile needs masks (max: end < start when empty)
    full_end = tl.maximum(start, start + (end - start) // BLOCK_N * BLOCK_N)
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q_tile, k_base, v_base, table_row, start, full_end, pos,
                                 stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
                                 HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, PRECISION)
    acc, l_i, m_i = attend_tiles(acc, l_i, m_i, q_tile, k_base, v_base, table_row, full_end, end, pos,
                                 stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, qk_scale,
                                 HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, PRECISION)
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty splits and padding rows: zeros
    o_ptr = o + seq * stride_ob + head[:, None] * stride_oh + split * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptr, acc, mask=(g < GROUP)[:, None])
    if SPLIT:  # log2-domain LSE; -inf for an empty split so the merge gives it no weight
        tl.store(lse + seq * stride_lb + head * stride_lh + split, m_i + tl.log2(l_i), mask=g < GROUP)


@triton.jit
def _merge_kernel(part, lse, out, num_splits,
                  stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_od,
                  HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    seq, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    used = s < num_splits
    lse_s = tl.load(lse + seq * stride_lb + head * stride_lh + s, mask=used, other=float("-inf"))
    top = tl.max(lse_s, 0)
    weight = tl.exp2(lse_s - tl.where(top == float("-inf"), 0.0, top))  # all empty (padding row): all zero
    o_s = tl.load(part + seq * stride_pb + head * stride_ph + s[:, None] * stride_ps + offs_d[None, :],
                  mask=used[:, None], other=0.0)
    total = tl.sum(weight, 0)
    merged = tl.sum(o_s * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out + seq * stride_ob + head * stride_oh + offs_d * stride_od, merged)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                           seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, num_splits: int,
                           block_n: int | None = None, num_warps: int = 4, num_stages: int | None = None) -> None:
    """out[B, H, D] = attention of each sequence's one new token q[B, H, D] (any strides) over its seq_lens[b]
    cached keys. Reads no tensor values on the host. block_n and the launch settings are for tests and tuning."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    check_head_dim(head_dim)
    if batch == 0:
        return
    group = num_heads // num_kv_heads
    tiles = decode_tiles(batch)
    block_n, num_stages = block_n or tiles[0], num_stages or tiles[1]
    split = num_splits > 1
    if split:  # normalized partial outputs and their LSEs, merged below
        part = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        o, o_strides, lse_strides = part, part.stride(), lse.stride()[:2]
    else:  # one split is already the answer: write it straight out
        o, lse = out, None
        o_strides, lse_strides = (*out.stride()[:2], 0, out.stride(2)), (0, 0)
    grid = (batch, num_kv_heads, num_splits) if split else (num_kv_heads, batch, 1)
    _decode_kernel[grid](
        q, k_cache, v_cache, o, lse, seq_lens, block_tables, scale * LOG2E, num_splits,
        *q.stride(), *o_strides, *lse_strides, *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, SPLIT=split, PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _merge_kernel[(batch, num_heads)](
            part, lse, out, num_splits, *part.stride()[:3], *lse.stride()[:2], *out.stride(),
            HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=1 if head_dim <= 64 else 2,
        )
