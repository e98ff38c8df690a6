"""Our own Triton kernels (engine/kernels): store the new K/V, then flash-decoding for decode rows (a whole decode
step, the shape CUDA graphs capture, or a mixed batch's leading decodes) and the varlen paged prefill kernel for
the rest. From the packed qkv projection, one kernel applies (Qwen3's q/k norm and) the rotary embedding and
stores K/V. Nothing here reads tensor values on the host, so the decode path replays in a CUDA graph."""

from __future__ import annotations

import torch

from engine.kernels.decode_attention import choose_num_splits, paged_decode_attention
from engine.kernels.kv_store import store_kv
from engine.kernels.prefill_attention import paged_prefill_attention
from engine.kernels.rope_store import rope_store_kv
from engine.layers.attention_backends.base import AttentionBackend, AttentionMetadata

_DEFAULT_SMS = 132  # under the CPU interpreter: an H100/H200's count, so splits are chosen as on the GPU


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    supports_cuda_graphs = True

    def __init__(self, ops) -> None:
        super().__init__(ops)
        self._num_sms: dict[torch.device, int] = {}

    def num_sms(self, device: torch.device) -> int:
        if device.type != "cuda":
            return _DEFAULT_SMS
        if device not in self._num_sms:
            self._num_sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return self._num_sms[device]

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        store_kv(k, v, k_cache, v_cache, slot_mapping)

    def forward_packed(self, qkv, num_heads: int, num_kv_heads: int, rope, q_norm, k_norm, k_cache, v_cache,
                       meta: AttentionMetadata, scale: float) -> torch.Tensor:
        norm = q_norm is not None
        q = rope_store_kv(qkv, num_heads, num_kv_heads, *rope, q_norm.weight if norm else None,
                          k_norm.weight if norm else None, q_norm.eps if norm else 0.0, k_cache, v_cache,
                          meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, scale)

    def num_decode_rows(self, meta: AttentionMetadata) -> int:
        # In the prefill kernel each decode row would be a sequence of empty row tiles as long as the batch's
        # longest prompt. A mixed batch hands over its decodes in multiples of 4: the prefill kernel then gets
        # 16-byte aligned views, as in warmup, so no new Triton specialization is compiled while serving.
        return meta.num_seqs if meta.is_decode else meta.num_decodes // 4 * 4

    def decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out) -> None:
        n = q.shape[0]
        # under a CUDA graph the table is full width (max_model_len), so splits depend on the batch size only;
        # eager steps pass their widest table, fitting the splits to this step's contexts
        max_len = meta.block_tables.shape[1] * k_cache.shape[1]
        splits = choose_num_splits(n, k_cache.shape[2], max_len, self.num_sms(q.device))
        paged_decode_attention(q, k_cache, v_cache, out, meta.seq_lens[:n], meta.block_tables[:n], scale, splits)

    def prefill(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out, first: int) -> None:
        # views past the decodes; query_start stays absolute
        paged_prefill_attention(q, k_cache, v_cache, out, meta.query_start[first:], meta.seq_lens[first:],
                                meta.block_tables[first:], meta.max_query_len, scale)
