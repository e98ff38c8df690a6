"""The reference backend: plain PyTorch (scaled_dot_product_attention over contexts gathered from the cache).
Runs everywhere; every other backend is tested against it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.layers.attention import AttentionMetadata


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


class TorchAttentionBackend:
    name = "torch"
    supports_cuda_graphs = False
    block_size_multiple = 1

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        block_size = k_cache.shape[1]
        flat_k = k_cache.view(-1, *k_cache.shape[2:])
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        if meta.is_decode:
            return self._decode(q, flat_k, flat_v, meta, block_size, scale)
        out = torch.empty_like(q)
        starts = meta.query_start.tolist()
        for i, (q_len, ctx) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
            row = starts[i]
            qp = q[row : row + q_len].transpose(0, 1)  # [H, q, D]
            if ctx == q_len:  # nothing cached before these tokens: attend over them directly
                kp, vp = k[row : row + q_len].transpose(0, 1), v[row : row + q_len].transpose(0, 1)
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
            else:
                slots = context_slots(meta.block_tables[i : i + 1], ctx, block_size)[0]
                kp = flat_k.index_select(0, slots).transpose(0, 1)  # [KVH, ctx, D]
                vp = flat_v.index_select(0, slots).transpose(0, 1)
                # query j sits at position ctx - q_len + j and sees every key up to it
                mask = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).tril(ctx - q_len)
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
            out[row : row + q_len] = op.transpose(0, 1)
        return out

    @staticmethod
    def _decode(q, flat_k, flat_v, meta: AttentionMetadata, block_size: int, scale: float) -> torch.Tensor:
        """One query per sequence against its gathered context, all sequences in one call."""
        bd, ctx = q.shape[0], meta.max_seq_len
        head_dim = q.shape[-1]
        slots = context_slots(meta.block_tables, ctx, block_size).flatten()
        kd = flat_k.index_select(0, slots).view(bd, ctx, -1, head_dim).transpose(1, 2)  # [B, KVH, L, D]
        vd = flat_v.index_select(0, slots).view(bd, ctx, -1, head_dim).transpose(1, 2)
        mask = None
        if min(meta.seq_lens_host) < ctx:  # padded contexts: mask the padding
            lens = meta.seq_lens.long()
            mask = (torch.arange(ctx, device=q.device)[None, :] < lens[:, None])[:, None, None, :]
        od = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)
        return od.squeeze(2)
