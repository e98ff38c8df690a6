"""The attention layer of a decoder: holds its share of the paged KV cache and hands the step to the attention
backend the runner chose (layers/attention_backends/)."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.attention_backends.base import AttentionBackend, AttentionMetadata


class Attention(nn.Module):
    """Writes this layer's new K/V into its cache slots and attends over each sequence's context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        # bound by the model runner once it has chosen the backend and sized the pool (kv_cache.allocate)
        self.backend: AttentionBackend | None = None
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], q_norm, k_norm,
                meta: AttentionMetadata) -> torch.Tensor:
        """qkv [T, H + 2 * KVH, D] as projected -> [T, H * D]: the rotary embedding of q and k (after Qwen3's
        per-head q/k RMSNorm when q_norm/k_norm are given), then attention."""
        out = self.backend.forward_packed(qkv, self.num_heads, self.num_kv_heads, rope, q_norm, k_norm,
                                          self.k_cache, self.v_cache, meta, self.scale)
        return out.view(-1, self.num_heads * self.head_dim)
