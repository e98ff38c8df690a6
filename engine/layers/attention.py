"""Paged attention: one interface, backends chosen at start (`select_backend`). `torch` is the reference every
other backend is tested against.

The batch is flat: T tokens from B sequences, sequence i owning rows query_start[i]:query_start[i+1] and
ending at context length seq_lens[i] (its cached prefix plus these tokens). K/V live in a paged cache of shape
[num_blocks, block_size, kv_heads, head_dim] per layer (flash-attn's paged layout); a slot is
block_id * block_size + offset. A backend first writes the new K/V into their slots, then attends over each
sequence's whole context, so prefix-cache hits and chunked prefill are the same case as a fresh prompt.
Rows padded in for a CUDA graph have slot -1 (nothing written) and seq_len 0 (their output is ignored).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch
from torch import nn

from engine.layers.ops import ops

logger = logging.getLogger("kvgate")

BACKENDS = ("torch", "triton", "flash_attn")


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token, -1 for padding
    query_start: torch.Tensor  # [B+1] int32: flash-attn's cu_seqlens_q
    seq_lens: torch.Tensor  # [B] int32: context length, new tokens included
    key_start: torch.Tensor  # [B+1] int32: cumulative seq_lens, flash-attn's cu_seqlens_k
    block_tables: torch.Tensor  # [B, W] int32: each sequence's cache blocks in order, padded with 0
    max_query_len: int
    max_seq_len: int
    # host copies for the reference backend's per-sequence loop (never read under a CUDA graph)
    query_lens_host: list[int]
    seq_lens_host: list[int]
    # leading sequences that bring one new token each (a mixed batch's decodes): a backend may give them its
    # decode kernel and the rest its prefill kernel
    num_decodes: int = 0

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new token (the shape CUDA graphs capture)."""
        return self.max_query_len == 1


def build_metadata(query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int,
                   device, num_blocks_per_seq: int | None = None) -> AttentionMetadata:
    """Metadata for one step, built on the host and copied once per tensor (tests and the reference path;
    the model runner fills persistent buffers the same way)."""
    slots: list[int] = []
    for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(s_len - q_len, s_len))
    width = num_blocks_per_seq or max((len(t) for t in block_tables), default=1) or 1
    tables = torch.zeros(len(block_tables), width, dtype=torch.int32)
    for i, table in enumerate(block_tables):
        tables[i, : len(table)] = torch.tensor(table[:width], dtype=torch.int32)
    q_start = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    q_start[1:] = torch.tensor(query_lens, dtype=torch.int32).cumsum(0)
    k_start = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    k_start[1:] = torch.tensor(seq_lens, dtype=torch.int32).cumsum(0)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long).to(device),
        query_start=q_start.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
        key_start=k_start.to(device),
        block_tables=tables.to(device),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_lens_host=list(query_lens),
        seq_lens_host=list(seq_lens),
        num_decodes=leading_decodes(query_lens),
    )


def leading_decodes(query_lens) -> int:
    """How many sequences at the front of the batch bring exactly one new token."""
    return next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))


def select_backend(name: str, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """The backend called `name`; `auto` picks flash_attn when importable on CUDA (it takes fp16/bf16 only),
    else triton on CUDA, else torch."""
    if name == "auto":
        if device.type != "cuda":
            name = "torch"
        elif importlib.util.find_spec("flash_attn") is not None and dtype in (torch.float16, torch.bfloat16):
            name = "flash_attn"
        else:
            name = "triton"
    if name == "torch":
        from engine.layers.attention_torch import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from engine.layers.attention_triton import TritonAttentionBackend

        return TritonAttentionBackend()
    if name == "flash_attn":
        from engine.layers.attention_flash import FlashAttentionBackend

        return FlashAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; available: auto, {', '.join(BACKENDS)}")


class Attention(nn.Module):
    """Writes this layer's new K/V into its cache slots and attends over each sequence's context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        # bound by the model runner once it has chosen the backend and sized the pool
        self.backend = None
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k and v [T, KVH, D] -> [T, H * D]."""
        out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return out.view(-1, self.num_heads * self.head_dim)

    def forward_packed(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], q_norm, k_norm,
                       meta: AttentionMetadata) -> torch.Tensor:
        """qkv [T, H + 2 * KVH, D] as projected: the rotary embedding (after Qwen3's per-head q/k RMSNorm when
        q_norm/k_norm are given) of q and k, then attention. A backend with forward_packed does it all in its own
        kernels; otherwise the ops here, then forward."""
        heads, kv_heads = self.num_heads, self.num_kv_heads
        if hasattr(self.backend, "forward_packed"):
            out = self.backend.forward_packed(qkv, heads, kv_heads, rope, q_norm, k_norm, self.k_cache, self.v_cache,
                                              meta, self.scale)
            return out.view(-1, heads * self.head_dim)
        v = qkv[:, heads + kv_heads :]
        if q_norm is None:  # q and k side by side: one rotation for both
            qk = ops.rotary(qkv[:, : heads + kv_heads], *rope)
            q, k = qk[:, :heads], qk[:, heads:]
        else:
            q = ops.norm_rotary(qkv[:, :heads], q_norm.weight, q_norm.eps, *rope)
            k = ops.norm_rotary(qkv[:, heads : heads + kv_heads], k_norm.weight, k_norm.eps, *rope)
        return self.forward(q, k, v, meta)
