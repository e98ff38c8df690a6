"""Our own Triton kernels (engine/kernels): store the new K/V, then flash-decoding for decode rows (a whole decode
step, the shape CUDA graphs capture, or a mixed batch's leading decodes) and the varlen paged prefill kernel for
the rest.
Nothing here reads tensor values on the host, so the decode path replays in a CUDA graph."""

from __future__ import annotations

import torch

from engine.kernels.decode_attention import choose_num_splits, paged_decode_attention
from engine.kernels.kv_store import store_kv
from engine.kernels.prefill_attention import paged_prefill_attention
from engine.kernels.rope_store import rope_store_kv
from engine.layers.attention import AttentionMetadata


class TritonAttentionBackend:
    name = "triton"
    supports_cuda_graphs = True
    block_size_multiple = 1

    def __init__(self) -> None:
        self._num_sms: dict[torch.device, int] = {}

    def num_sms(self, device: torch.device) -> int:
        if device not in self._num_sms:
            self._num_sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return self._num_sms[device]

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale)

    def forward_packed(self, qkv, num_heads: int, num_kv_heads: int, rope, q_norm, k_norm, k_cache, v_cache,
                       meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """From the packed qkv projection: one kernel for (Qwen3's q/k norm,) the rotation and the K/V store."""
        norm = q_norm is not None
        q = rope_store_kv(qkv, num_heads, num_kv_heads, *rope, q_norm.weight if norm else None,
                          k_norm.weight if norm else None, q_norm.eps if norm else 0.0, k_cache, v_cache,
                          meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous: the caller views it [T, H * D]
        # decode rows (all of a decode step, or a mixed batch's leading ones) get the flash-decoding kernel: in
        # the prefill kernel each would be a sequence of empty row tiles as long as the batch's longest prompt
        # (a multiple of 4 in mixed batches: the prefill kernel then gets 16-byte aligned views, as in warmup, and
        # no new Triton specialization is compiled while serving)
        decodes = q.shape[0] if meta.is_decode else meta.num_decodes // 4 * 4
        if decodes:
            kv_heads = k_cache.shape[2]
            # under a CUDA graph the table is full width (max_model_len), so splits depend on the batch size only;
            # eager steps pass their widest table, fitting the splits to this step's contexts
            max_len = meta.block_tables.shape[1] * k_cache.shape[1]
            sms = self.num_sms(q.device) if q.device.type == "cuda" else 132
            splits = choose_num_splits(decodes, kv_heads, max_len, sms)
            paged_decode_attention(q[:decodes], k_cache, v_cache, out[:decodes], meta.seq_lens[:decodes],
                                   meta.block_tables[:decodes], scale, splits)
        if decodes < meta.seq_lens.shape[0]:  # the rest: views past the decodes; query_start stays absolute
            paged_prefill_attention(q, k_cache, v_cache, out, meta.query_start[decodes:], meta.seq_lens[decodes:],
                                    meta.block_tables[decodes:], meta.max_query_len, scale)
        return out
