"""The flash_attn backend: flash-attn 2's paged kernels read our KV cache in place (it is their paged layout).

Decode uses `flash_attn_with_kvcache` (no host sync, so CUDA graphs can capture it); prefill and mixed batches use
`flash_attn_varlen_func` with a block table, which attends over each sequence's cached prefix too (causal masks
are bottom-right aligned since flash-attn 2.1), so prefix-cache hits and chunked prefill need nothing special.
"""

from __future__ import annotations

import importlib.util

import torch

from engine.layers.attention_backends.base import AttentionBackend, AttentionMetadata
from engine.layers.attention_backends.torch_backend import write_kv


class FlashAttentionBackend(AttentionBackend):
    name = "flash_attn"
    dtypes = (torch.float16, torch.bfloat16)
    supports_cuda_graphs = True
    block_size_multiple = 256  # flash-attn 2 rejects paged KV blocks not divisible by 256

    def __init__(self, ops) -> None:
        super().__init__(ops)
        try:
            from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
        except ImportError as e:
            raise ImportError(
                "the flash_attn attention backend needs the flash-attn package: pip install kvgate[flash] "
                "(or choose --attention-backend triton)"
            ) from e
        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec("flash_attn") is not None

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        if k.is_cuda:  # the Triton store skips padding rows on the device: nothing syncs, CUDA graphs capture it
            from engine.kernels.kv_store import store_kv

            store_kv(k, v, k_cache, v_cache, slot_mapping)
        else:  # the stand-in tests on the CPU
            write_kv(k, v, k_cache, v_cache, slot_mapping)

    def decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out) -> None:
        out.copy_(self._with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens,
                                     block_table=meta.block_tables, softmax_scale=scale, causal=True).squeeze(1))

    def prefill(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out, first: int) -> None:
        out.copy_(self._varlen(q, k_cache, v_cache, cu_seqlens_q=meta.query_start, cu_seqlens_k=meta.key_start,
                               max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_seq_len, softmax_scale=scale,
                               causal=True, block_table=meta.block_tables))
