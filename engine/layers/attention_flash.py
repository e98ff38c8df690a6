"""The flash_attn backend: flash-attn 2's paged kernels read our KV cache in place (it is their paged layout).

Decode uses `flash_attn_with_kvcache` (no host sync, so CUDA graphs can capture it); prefill and mixed batches use
`flash_attn_varlen_func` with a block table, which attends over each sequence's cached prefix too (causal masks
are bottom-right aligned since flash-attn 2.1), so prefix-cache hits and chunked prefill need nothing special.
"""

from __future__ import annotations

from engine.layers.attention import AttentionMetadata
from engine.layers.attention_torch import write_kv


class FlashAttentionBackend:
    name = "flash_attn"
    supports_cuda_graphs = True
    block_size_multiple = 256  # flash-attn 2 rejects paged KV blocks not divisible by 256

    def __init__(self) -> None:
        try:
            from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
        except ImportError as e:
            raise ImportError(
                "the flash_attn attention backend needs the flash-attn package: pip install kvgate[flash] "
                "(or choose --attention-backend triton)"
            ) from e
        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        if k.is_cuda:  # the Triton store skips padding rows on the device: nothing syncs, CUDA graphs capture it
            from engine.kernels.kv_store import store_kv

            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        else:  # the stand-in tests on the CPU
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            out = self._with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens,
                                     block_table=meta.block_tables, softmax_scale=scale, causal=True)
            return out.squeeze(1)
        return self._varlen(q, k_cache, v_cache, cu_seqlens_q=meta.query_start, cu_seqlens_k=meta.key_start,
                            max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_seq_len, softmax_scale=scale,
                            causal=True, block_table=meta.block_tables)
