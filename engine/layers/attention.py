"""Paged attention: one interface, backends chosen at start. `torch` is the reference every other backend
is tested against.

The batch is flat: T tokens from B sequences, sequence i owning tokens query_start[i]:query_start[i+1] and
ending at context length seq_lens[i] (its cached prefix plus these tokens). K/V live in a paged cache of shape
[num_blocks, block_size, kv_heads, head_dim] per layer; a slot is block_id * block_size + offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    # decode group: sequences with one new token, batched in one call
    decode_token_idx: torch.Tensor  # [Bd] their token's row in the flat batch
    decode_slots: torch.Tensor  # [Bd, L] cache slots of their context, padded
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, L] True where the slot is in the context; None: all are
    # prefill group: (first row, number of new tokens, context slots [ctx]) per sequence with several new tokens
    prefills: list[tuple[int, int, torch.Tensor]]


def build_metadata(
    query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int, device
) -> AttentionMetadata:
    """Everything every layer needs for one step, computed once on the host and copied once."""
    slot_mapping: list[int] = []
    decode_rows, decode_tables, decode_lens = [], [], []
    prefills = []
    row = 0
    for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
        start = s_len - q_len
        slot_mapping.extend(table[p // block_size] * block_size + p % block_size for p in range(start, s_len))
        if q_len == 1:
            decode_rows.append(row)
            decode_tables.append(table)
            decode_lens.append(s_len)
        else:
            prefills.append((row, q_len, _context_slots(table, s_len, block_size)))
        row += q_len
    max_len = max(decode_lens, default=0)
    slots = torch.zeros(len(decode_rows), max_len, dtype=torch.long)
    for i, (table, s_len) in enumerate(zip(decode_tables, decode_lens)):
        slots[i, :s_len] = _context_slots(table, s_len, block_size)
    lens = torch.tensor(decode_lens, dtype=torch.long)
    mask = None
    if decode_lens and min(decode_lens) < max_len:  # padded contexts: mask the padding
        mask = (torch.arange(max_len)[None, :] < lens[:, None])[:, None, None, :].to(device, non_blocking=True)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long).to(device, non_blocking=True),
        decode_token_idx=torch.tensor(decode_rows, dtype=torch.long).to(device, non_blocking=True),
        decode_slots=slots.to(device, non_blocking=True),
        decode_mask=mask,
        prefills=[(r, q, s.to(device, non_blocking=True)) for r, q, s in prefills],
    )


def _context_slots(table: list[int], seq_len: int, block_size: int) -> torch.Tensor:
    blocks = torch.tensor(table[: -(-seq_len // block_size)], dtype=torch.long)
    slots = (blocks[:, None] * block_size + torch.arange(block_size)[None, :]).flatten()
    return slots[:seq_len]


class TorchAttentionBackend:
    """Reference paged attention with scaled_dot_product_attention: gathers each context from the cache."""

    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        num_heads, head_dim = q.shape[1], q.shape[2]
        flat_k = k_cache.view(-1, *k_cache.shape[2:])
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        flat_k.index_copy_(0, meta.slot_mapping, k)
        flat_v.index_copy_(0, meta.slot_mapping, v)
        if not meta.prefills:  # a pure decode step: every row is a one-token sequence, in order
            return self._decode(q, flat_k, flat_v, meta, scale).reshape(-1, num_heads * head_dim)
        out = torch.empty_like(q)
        if meta.decode_token_idx.numel():
            od = self._decode(q.index_select(0, meta.decode_token_idx), flat_k, flat_v, meta, scale)
            out.index_copy_(0, meta.decode_token_idx, od)
        for row, q_len, slots in meta.prefills:
            qp = q[row : row + q_len].transpose(0, 1)  # [H, q, D]
            ctx = slots.shape[0]
            if ctx == q_len:  # nothing cached before these tokens: attend over them directly
                kp, vp = k[row : row + q_len].transpose(0, 1), v[row : row + q_len].transpose(0, 1)
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
            else:
                kp = flat_k.index_select(0, slots).transpose(0, 1)  # [KVH, ctx, D]
                vp = flat_v.index_select(0, slots).transpose(0, 1)
                # query i sits at position ctx - q_len + i and sees every key up to it
                mask = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).tril(ctx - q_len)
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
            out[row : row + q_len] = op.transpose(0, 1)
        return out.view(-1, num_heads * head_dim)

    @staticmethod
    def _decode(q, flat_k, flat_v, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """One query per sequence against its gathered context: q [Bd, H, D] -> [Bd, H, D]."""
        bd, ctx = meta.decode_slots.shape
        slots = meta.decode_slots.flatten()
        head_dim = q.shape[-1]
        kd = flat_k.index_select(0, slots).view(bd, ctx, -1, head_dim).transpose(1, 2)  # [Bd, KVH, L, D]
        vd = flat_v.index_select(0, slots).view(bd, ctx, -1, head_dim).transpose(1, 2)
        od = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, attn_mask=meta.decode_mask, scale=scale,
                                            enable_gqa=True)
        return od.squeeze(2)


def get_backend(name: str):
    if name in ("auto", "torch"):
        return TorchAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; available: torch")


class Attention(nn.Module):
    """Writes this layer's new K/V into its cache slots and attends over each sequence's context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        # bound by the model runner once it has chosen the backend and sized the pool
        self.backend: TorchAttentionBackend | None = None
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
