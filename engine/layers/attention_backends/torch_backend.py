"""The reference backend: plain PyTorch (scaled_dot_product_attention over contexts gathered from the cache).
Runs everywhere; every other backend is tested against it."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from engine.layers.attention_backends.base import AttentionBackend, AttentionMetadata


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Store the new tokens' K/V ([T, KVH, D]) in their cache slots; padding rows (slot -1) are skipped."""
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat_k.index_copy_(0, slot_mapping, k)
    flat_v.index_copy_(0, slot_mapping, v)


def context_slots(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """[B, length] cache slots of positions 0..length-1 of each sequence (past its end: whatever the padded
    table says, to be masked)."""
    pos = torch.arange(length, device=block_tables.device)
    return block_tables[:, pos // block_size].long() * block_size + pos % block_size


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    supports_cuda_graphs = False  # reads sequence lengths on the host

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        write_kv(k, v, k_cache, v_cache, slot_mapping)

    def decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out) -> None:
        """One query per sequence against its gathered context, all sequences in one call."""
        n, head_dim, block_size = q.shape[0], q.shape[-1], k_cache.shape[1]
        ctx = max(meta.seq_lens_host[:n])
        slots = context_slots(meta.block_tables[:n], ctx, block_size).flatten()
        kd = k_cache.view(-1, *k_cache.shape[2:]).index_select(0, slots).view(n, ctx, -1, head_dim).transpose(1, 2)
        vd = v_cache.view(-1, *v_cache.shape[2:]).index_select(0, slots).view(n, ctx, -1, head_dim).transpose(1, 2)
        mask = None
        if min(meta.seq_lens_host[:n]) < ctx:  # contexts of several lengths: mask each one's padding
            lens = meta.seq_lens[:n].long()
            mask = (torch.arange(ctx, device=q.device)[None, :] < lens[:, None])[:, None, None, :]
        od = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)
        out.copy_(od.squeeze(2))

    def prefill(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out, first: int) -> None:
        block_size = k_cache.shape[1]
        flat_k = k_cache.view(-1, *k_cache.shape[2:])
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        starts = [0, *itertools.accumulate(meta.query_lens_host)]
        for i in range(first, meta.num_seqs):
            row, q_len, ctx = starts[i], meta.query_lens_host[i], meta.seq_lens_host[i]
            qp = q[row : row + q_len].transpose(0, 1)  # [H, q, D]
            slots = context_slots(meta.block_tables[i : i + 1], ctx, block_size)[0]
            kp = flat_k.index_select(0, slots).transpose(0, 1)  # [KVH, ctx, D]
            vp = flat_v.index_select(0, slots).transpose(0, 1)
            # query j sits at position ctx - q_len + j and sees every key up to it
            mask = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).tril(ctx - q_len)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
            out[row : row + q_len] = op.transpose(0, 1)
