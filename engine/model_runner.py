"""ModelRunner: the only module that touches the device — weights, the KV cache, inputs, sampling."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.layers.attention import build_metadata, select_backend
from engine.layers.sampler import Sampler, SamplerOutput
from engine.loader import load_model
from engine.scheduler import ScheduledBatch

logger = logging.getLogger("kvgate")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32  # CPUs here have no fast half-precision matmul
    # On a GPU: the checkpoint's own dtype, as transformers does; bf16 when it records none.
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    stored = getattr(torch, stored, None) if isinstance(stored, str) else stored
    return stored if stored in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, model_dir: Path, max_model_len: int) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        torch.manual_seed(config.seed)
        self.model = load_model(hf_config, model_dir, config.load_format, self.dtype, self.device,
                                max_model_len, config.seed)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.sampler = Sampler()
        self.backend = select_backend(config.attention_backend, self.device)
        self.num_kv_blocks = self._allocate_kv_cache()

    # -- KV cache -------------------------------------------------------------------------------------------
    def _bytes_per_block(self) -> int:
        layers = self.model.attention_layers()
        first = layers[0]
        per_token = 2 * len(layers) * first.num_kv_heads * first.head_dim * self.dtype.itemsize
        return per_token * self.block_size

    def _allocate_kv_cache(self) -> int:
        per_block = self._bytes_per_block()
        if self.config.num_kv_blocks is not None:
            num_blocks = self.config.num_kv_blocks
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1.0 - self.config.gpu_memory_utilization) - self._activation_reserve()
            num_blocks = int(budget // per_block)
        else:
            num_blocks = int(self.config.cpu_kv_cache_gib * 2**30 // per_block)
        if self.config.num_kv_blocks is None:
            # more than every sequence at full length can never be used
            most = self.config.max_num_seqs * -(-self.max_model_len // self.block_size)
            num_blocks = min(num_blocks, most)
        if num_blocks < 1:
            raise ValueError(
                f"no room for the KV cache: one block takes {per_block} bytes; lower the model size, or raise "
                f"gpu_memory_utilization ({self.config.gpu_memory_utilization}) or num_kv_blocks"
            )
        layers = self.model.attention_layers()
        shape = (num_blocks, self.block_size, layers[0].num_kv_heads, layers[0].head_dim)
        for layer in layers:
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.backend = self.backend
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB)", num_blocks, self.block_size,
                    num_blocks * self.block_size, num_blocks * per_block / 2**30)
        return num_blocks

    def _activation_reserve(self) -> int:
        """Memory a worst-case step needs beside the weights and the cache: logits and hidden states."""
        cfg = self.model.config
        tokens = self.config.max_num_batched_tokens
        hidden = tokens * max(cfg.hidden_size, cfg.intermediate_size) * 4 * self.dtype.itemsize
        logits = self.config.max_num_seqs * cfg.vocab_size * 4 * 3
        return hidden + logits

    # -- one step -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[int | None], list]:
        """Run the model over the batch. Returns, per sequence, the sampled token (None while a prompt is
        still being prefilled) and its logprobs entry (None unless asked for)."""
        input_ids, positions, seq_lens = [], [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            seq_lens.append(start + n)
        meta = build_metadata(batch.num_new_tokens, seq_lens, [s.block_table for s in batch.seqs],
                              self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True)
        hidden = self.model(ids, pos, meta)

        rows, sampling = [], []
        end = 0
        for seq, n, sample in zip(batch.seqs, batch.num_new_tokens, batch.sample):
            end += n
            if sample:
                rows.append(end - 1)
                sampling.append(seq)
        if not rows:
            return [None] * len(batch.seqs), [None] * len(batch.seqs)
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        out: SamplerOutput = self.sampler(logits, sampling)
        tokens, logprobs = iter(out.token_ids), iter(out.logprobs or [None] * len(rows))
        sampled = [next(tokens) if s else None for s in batch.sample]
        entries = [next(logprobs) if s else None for s in batch.sample]
        return sampled, entries
