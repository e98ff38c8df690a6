"""ModelRunner: the only module that touches the device — weights, the KV cache, inputs, CUDA graphs, sampling.

Start-up on CUDA: load the weights, run the worst-case step on a scratch cache and measure its peak memory, size
the KV pool from what is left of total × gpu_memory_utilization (`max_batch_total_tokens`), then capture the
decode CUDA graphs. On the CPU the pool is `cpu_kv_cache_gib` and everything runs eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import kv_cache
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.layers.attention import select_backend
from engine.layers.ops import compile_ops, eager_ops
from engine.layers.sampler import PendingSample, Sampler, SamplerOutput
from engine.loader import load_model
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from engine.step_inputs import StepInputs

logger = logging.getLogger("kvgate")

DEFAULT_BLOCK_SIZE = 16


@dataclass
class LaunchedStep:
    batch: ScheduledBatch
    sample: PendingSample | None  # None when no row samples (prompt chunks only)


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


def resolve_block_size(requested: int | None, backend) -> int:
    """16 tokens per block, or the smallest page the backend accepts (flash-attn's paged kernels need 256)."""
    if requested is None:
        return max(DEFAULT_BLOCK_SIZE, backend.block_size_multiple)
    if requested % backend.block_size_multiple:
        raise ValueError(f"block_size {requested} does not suit the {backend.name} attention backend: it needs a "
                         f"multiple of {backend.block_size_multiple}")
    return requested


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, model_dir: Path, max_model_len: int) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        self.backend = select_backend(config.attention_backend, self.device, self.dtype)
        self.block_size = resolve_block_size(config.block_size, self.backend)
        self.max_model_len = max_model_len
        cuda = self.device.type == "cuda"
        torch.manual_seed(config.seed)
        self.model = load_model(hf_config, model_dir, config.load_format, self.dtype, self.device,
                                max_model_len, config.seed)
        if cuda and not config.enforce_eager:
            compile_ops()
        else:
            eager_ops()
        self.sampler = Sampler()
        self._last_sampled: tuple[torch.Tensor, dict[int, int]] | None = None  # the last launch's tokens, rows
        self.graphs: DecodeGraphs | None = None  # captured once the KV cache exists
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.inputs = StepInputs(max(config.max_num_batched_tokens, config.max_num_seqs), config.max_num_seqs,
                                 self.max_blocks_per_seq, self.block_size, self.device)
        self.num_kv_blocks = self._size_kv_cache() if cuda else self._cpu_kv_blocks()
        kv_cache.allocate(self.model, self.num_kv_blocks, self.block_size, self.dtype, self.device, self.backend)
        self.max_batch_total_tokens = self.num_kv_blocks * self.block_size
        per_block = kv_cache.bytes_per_block(self.model, self.dtype, self.block_size)
        logger.info("KV cache: %d blocks of %d tokens: max_batch_total_tokens %d (%.2f GiB); attention backend %s",
                    self.num_kv_blocks, self.block_size, self.max_batch_total_tokens,
                    self.num_kv_blocks * per_block / 2**30, self.backend.name)
        if self.max_batch_total_tokens < max_model_len:
            logger.warning("the KV cache holds %d tokens, fewer than max_model_len %d: longer requests are refused",
                           self.max_batch_total_tokens, max_model_len)
        if cuda and self.backend.supports_cuda_graphs and not config.enforce_eager:
            self.graphs = DecodeGraphs(self.model, self.inputs, config.max_num_seqs, max_model_len)
            self.graphs.capture()

    # -- KV cache sizing ------------------------------------------------------------------------------------
    def _cap(self, num_blocks: int) -> int:
        # more than every sequence at full length can never be used
        return min(num_blocks, self.config.max_num_seqs * self.max_blocks_per_seq)

    def _cpu_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        per_block = kv_cache.bytes_per_block(self.model, self.dtype, self.block_size)
        return self._cap(max(1, int(self.config.cpu_kv_cache_gib * 2**30 // per_block)))

    def _size_kv_cache(self) -> int:
        """Profile the worst steps on a scratch cache (this also compiles and autotunes every kernel), then give
        the KV pool what is left."""
        cfg = self.config
        scratch = -(-cfg.max_num_batched_tokens // self.block_size) + cfg.max_num_seqs + 1
        kv_cache.allocate(self.model, scratch, self.block_size, self.dtype, self.device, self.backend)
        activation = self._peak_of(self._worst_prefill())
        self.execute(self._small_mixed())
        graphs = self._peak_of(self._worst_decode()) if not cfg.enforce_eager else 0
        kv_cache.allocate(self.model, 0, self.block_size, self.dtype, self.device, self.backend)
        torch.cuda.empty_cache()
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        budget, accounting = kv_cache.cuda_kv_budget(self.device, cfg.gpu_memory_utilization, activation, graphs)
        logger.info("memory: %s", accounting)
        per_block = kv_cache.bytes_per_block(self.model, self.dtype, self.block_size)
        if budget < per_block:
            raise ValueError(f"the model does not fit with room for a KV cache on {self.device}: {accounting}; a "
                             f"block of {self.block_size} tokens takes {per_block / 2**20:.1f} MiB. Raise "
                             f"gpu_memory_utilization, lower max_num_batched_tokens ({cfg.max_num_batched_tokens}) "
                             f"or max_num_seqs ({cfg.max_num_seqs}), or use a smaller model")
        return self._cap(budget // per_block)

    def _peak_of(self, batch: ScheduledBatch) -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.execute(batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(self.device) - before

    def _warmup_batch(self, lengths: list[int], params: SamplingParams) -> ScheduledBatch:
        """Sequences of these lengths, all prefilling from scratch, laid out on consecutive scratch blocks."""
        batch, block = ScheduledBatch(), 0
        for i, n in enumerate(lengths):
            seq = Sequence(f"warmup-{i}", [0] * n, params)
            blocks = -(-n // self.block_size)
            seq.block_table = list(range(block, block + blocks))
            block += blocks
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            batch.sample.append(True)
        return batch

    def _worst_prefill(self) -> ScheduledBatch:
        """A full token budget, max_num_seqs rows sampled with every sampling feature and 20 logprobs."""
        cfg = self.config
        rows = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        left, lengths = cfg.max_num_batched_tokens - rows + 1, []
        while left > 0 and len(lengths) < rows:  # prompts no longer than max_model_len
            lengths.append(min(left, self.max_model_len))
            left -= lengths[-1]
        params = SamplingParams(temperature=0.6, top_p=0.9, top_k=50, min_p=0.01, logprobs=20, max_tokens=1)
        return self._warmup_batch(lengths + [1] * (rows - len(lengths)), params)

    def _small_mixed(self) -> ScheduledBatch:
        """Four one-token rows and a short prompt: the kernel variants a big prefill and the decode graphs do not
        compile (eager decodes beside a prompt, the prefill kernel's small tiles), compiled now rather than in
        the middle of serving, where a prompt mostly served from the prefix cache would wait seconds for them."""
        return self._warmup_batch([1, 1, 1, 1, 8], SamplingParams(temperature=0.0, max_tokens=1))

    def _worst_decode(self) -> ScheduledBatch:
        return self._warmup_batch([1] * self.config.max_num_seqs, SamplingParams(temperature=0.0, max_tokens=1))

    # -- one step -------------------------------------------------------------------------------------------
    def execute(self, batch: ScheduledBatch) -> tuple[list[int | None], list]:
        """Run the model over the batch and wait for it. Returns, per sequence, the sampled token (None while a
        prompt is still being prefilled) and its logprobs entry (None unless asked for)."""
        return self.collect(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Queue the step on the device and return without waiting for it. Inputs sampled by the previous
        launch and not yet collected are read from the device."""
        size = None
        if self.graphs is not None and all(c == 1 for c in batch.num_new_tokens):
            size = self.graphs.padded_size(len(batch.seqs))
        ids, positions, meta, sample_rows = self.inputs.prepare(batch, pad_to=size, pending=self._last_sampled)
        self._last_sampled = None
        if not any(batch.sample):
            self.model(ids, positions, meta)
            return LaunchedStep(batch, None)
        if size is not None:
            logits = self.graphs.replay(size)
            # a decode step samples every row, in order: a view instead of a gather over [rows, vocab]
            logits = logits[: len(batch.seqs)] if all(batch.sample) else logits[sample_rows]
        else:
            logits = self.model.compute_logits(self.model(ids, positions, meta)[sample_rows])
        sampling = [seq for seq, sample in zip(batch.seqs, batch.sample) if sample]
        pending = self.sampler.sample(logits, sampling)
        self._last_sampled = (pending.token_ids, {id(seq): row for row, seq in enumerate(sampling)})
        return LaunchedStep(batch, pending)

    def collect(self, step: LaunchedStep) -> tuple[list[int | None], list]:
        """Wait for a launched step's tokens: per sequence, the token (or None) and its logprobs entry."""
        n = len(step.batch.seqs)
        if step.sample is None:
            return [None] * n, [None] * n
        out: SamplerOutput = step.sample.result()
        tokens, logprobs = iter(out.token_ids), iter(out.logprobs or [None] * len(out.token_ids))
        sampled = [next(tokens) if s else None for s in step.batch.sample]
        entries = [next(logprobs) if s else None for s in step.batch.sample]
        return sampled, entries
