"""What an attention backend is: the metadata of a step it reads, and the methods it implements.

The batch is flat: T tokens from B sequences, sequence i owning rows query_start[i]:query_start[i+1] and
ending at context length seq_lens[i] (its cached prefix plus these tokens). K/V live in a paged cache of shape
[num_blocks, block_size, kv_heads, head_dim] per layer (flash-attn's paged layout); a slot is
block_id * block_size + offset. A backend first writes the new K/V into their slots, then attends over each
sequence's whole context, so prefix-cache hits and chunked prefill are the same case as a fresh prompt.
Rows padded in for a CUDA graph have slot -1 (nothing written) and seq_len 0 (their output is ignored).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token, -1 for padding
    query_start: torch.Tensor  # [B+1] int32: flash-attn's cu_seqlens_q
    seq_lens: torch.Tensor  # [B] int32: context length, new tokens included
    key_start: torch.Tensor  # [B+1] int32: cumulative seq_lens, flash-attn's cu_seqlens_k
    block_tables: torch.Tensor  # [B, W] int32: each sequence's cache blocks in order, padded with 0
    max_query_len: int
    max_seq_len: int
    # host copies, for backends that loop over sequences on the host (never read under a CUDA graph)
    query_lens_host: list[int]
    seq_lens_host: list[int]
    # leading sequences that bring one new token each (a mixed batch's decodes)
    num_decodes: int = 0

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new token (the shape CUDA graphs capture)."""
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """One way to run paged attention. Subclasses say what they support and implement the K/V store, decode
    (rows of one new token) and prefill (rows of several: prompts, chunks of prompts, anything after a cached
    prefix). `attend` splits a step between the two; `forward_packed` applies the rotary embedding with the
    runner's ops unless a backend fuses it into its own kernels."""

    name: ClassVar[str]
    dtypes: ClassVar[tuple[torch.dtype, ...]]  # cache and activation dtypes it computes in
    supports_cuda_graphs: ClassVar[bool]  # decode reads no tensor values on the host, so it can be captured
    block_size_multiple: ClassVar[int] = 1  # KV blocks must hold a multiple of this many tokens

    def __init__(self, ops) -> None:
        self.ops = ops  # the runner's elementwise ops (layers/ops.py), for the unfused rotary embedding

    @classmethod
    def is_available(cls) -> bool:
        """Whether what the backend needs is installed (checked by `auto` before choosing it)."""
        return True

    @abstractmethod
    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """Write k, v [T, KVH, D] into their cache slots; rows of slot -1 write nothing."""

    @abstractmethod
    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, out: torch.Tensor) -> None:
        """Sequences 0..len(q)-1 bring one query each: q [n, H, D]; writes out [n, H, D]."""

    @abstractmethod
    def prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, out: torch.Tensor, first: int) -> None:
        """Sequences first..B-1, whose rows of q [T, H, D] (absolute, from meta.query_start) attend causally
        over their contexts; writes those rows of out."""

    def num_decode_rows(self, meta: AttentionMetadata) -> int:
        """How many leading sequences take `decode`; the rest take `prefill`. By default a step is all decode
        or all prefill."""
        return meta.num_seqs if meta.is_decode else 0

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous: the caller views it [T, H * D]
        decodes = self.num_decode_rows(meta)
        if decodes:
            self.decode(q[:decodes], k_cache, v_cache, meta, scale, out[:decodes])
        if decodes < meta.num_seqs:
            self.prefill(q, k_cache, v_cache, meta, scale, out, decodes)
        return out

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [T, H, D], k and v [T, KVH, D] -> [T, H, D]."""
        self.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale)

    def forward_packed(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, rope, q_norm, k_norm,
                       k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """qkv [T, H + 2 * KVH, D] as projected: the rotary embedding of q and k (after Qwen3's per-head RMSNorm
        when q_norm/k_norm are given), then forward."""
        heads, kv_heads, ops = num_heads, num_kv_heads, self.ops
        v = qkv[:, heads + kv_heads :]
        if q_norm is None:  # q and k side by side: one rotation for both
            qk = ops.rotary(qkv[:, : heads + kv_heads], *rope)
            q, k = qk[:, :heads], qk[:, heads:]
        else:
            q = ops.norm_rotary(qkv[:, :heads], q_norm.weight, q_norm.eps, *rope)
            k = ops.norm_rotary(qkv[:, heads : heads + kv_heads], k_norm.weight, k_norm.eps, *rope)
        return self.forward(q, k, v, k_cache, v_cache, meta, scale)
