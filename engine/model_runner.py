"""ModelRunner: the only module that touches the device — weights, the KV cache, inputs, CUDA graphs, sampling.

Start-up on CUDA: load the weights, run the worst-case step on a scratch cache and measure its peak memory, size
the KV pool from what is left of total × gpu_memory_utilization (`max_batch_total_tokens`), then capture the
decode CUDA graphs. On the CPU the pool is `cpu_kv_cache_gib` and everything runs eagerly.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import kv_cache
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.layers.attention_backends import create_backend
from engine.layers.ops import Ops
from engine.layers.sampler import PendingSample, Sampler, SamplerOutput
from engine.loader import load_model
from engine.prompt_logprobs import PendingPromptLogprobs, queue_prompt_logprobs, reports_prompt_logprobs
from engine.sampling_inputs import sampling_tensors
from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from engine.scheduler import ScheduledRequest, SchedulerOutput
from engine.step_inputs import StepInputs

logger = logging.getLogger("kvgate")

DEFAULT_BLOCK_SIZE = 16


@dataclass
class LaunchedStep:
    output: SchedulerOutput
    sample: PendingSample | None  # None when no row samples (prompt chunks only)
    prompt_logprobs: PendingPromptLogprobs | None = None  # None when no row reports any


@dataclass
class Forward:
    """A queued forward pass: the rows that sample and their logits (None when none samples)."""
    step: SchedulerOutput
    sampling: list[ScheduledRequest]
    logits: torch.Tensor | None
    prompt_logprobs: PendingPromptLogprobs | None = None

    @functools.cached_property
    def constrained(self) -> bool:  # asked twice a step: the rows are scanned once
        return any(row.params.structured_outputs is not None for row in self.sampling)


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
        cuda = self.device.type == "cuda"
        self.ops = Ops.compiled() if cuda and not config.enforce_eager else Ops.eager()
        self.backend = create_backend(config.attention_backend, self.device, self.dtype, self.ops)
        self.block_size = resolve_block_size(config.block_size, self.backend)
        self.max_model_len = max_model_len
        self.vocab_size = hf_config.vocab_size
        self.model = load_model(hf_config, model_dir, config.load_format, self.dtype, self.device,
                                max_model_len, self.ops, config.seed, config.quantization)
        # the engine's own random draws (unseeded requests); seeded requests get generators of their own
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(config.seed),
                               torch.Generator().manual_seed(config.seed))
        self._last_sampled: tuple[torch.Tensor, dict[str, int]] | None = None  # the last launch's tokens, rows
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

    def _peak_of(self, step: SchedulerOutput) -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.execute(step)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(self.device) - before

    def _warmup_step(self, lengths: list[int], params: SamplingParams) -> SchedulerOutput:
        """Requests of these lengths, all prefilling from scratch, laid out on consecutive scratch blocks."""
        out, block = SchedulerOutput(), 0
        for i, n in enumerate(lengths):
            blocks = -(-n // self.block_size)
            row = ScheduledRequest(f"warmup-{i}", [0] * n, 0, n, list(range(block, block + blocks)), True, params,
                                   num_prompt_tokens=n)
            block += blocks
            (out.decodes if n == 1 else out.prefills).append(row)
        return out

    def _worst_prefill(self) -> SchedulerOutput:
        """A full token budget, max_num_seqs rows sampled with every sampling feature and the most logprobs."""
        cfg = self.config
        rows = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        left, lengths = cfg.max_num_batched_tokens - rows + 1, []
        while left > 0 and len(lengths) < rows:  # prompts no longer than max_model_len
            lengths.append(min(left, self.max_model_len))
            left -= lengths[-1]
        params = SamplingParams(temperature=0.6, top_p=0.9, top_k=50, min_p=0.01, logprobs=MAX_LOGPROBS, max_tokens=1,
                                prompt_logprobs=MAX_LOGPROBS)
        return self._warmup_step(lengths + [1] * (rows - len(lengths)), params)

    def _small_mixed(self) -> SchedulerOutput:
        """Four one-token rows and a short prompt: the kernel variants a big prefill and the decode graphs do not
        compile (eager decodes beside a prompt, the prefill kernel's small tiles), compiled now rather than in
        the middle of serving, where a prompt mostly served from the prefix cache would wait seconds for them."""
        return self._warmup_step([1, 1, 1, 1, 8], SamplingParams(temperature=0.0, max_tokens=1))

    def _worst_decode(self) -> SchedulerOutput:
        return self._warmup_step([1] * self.config.max_num_seqs, SamplingParams(temperature=0.0, max_tokens=1))

    # -- seeded requests ------------------------------------------------------------------------------------
    def request_generator(self, seed: int) -> torch.Generator:
        """A seeded request's own generator, on the device its draws are made on."""
        return torch.Generator(self.device).manual_seed(seed)

    # -- one step -------------------------------------------------------------------------------------------
    def execute(self, step: SchedulerOutput) -> tuple[list[int | None], list]:
        """Run the model over the step and wait for it. Returns, per row of step.rows, the sampled token (None
        while a prompt is still being prefilled) and its logprobs entry (None unless asked for)."""
        return self.collect(self.launch(step))

    def launch(self, step: SchedulerOutput) -> LaunchedStep:
        """Queue the step on the device and return without waiting for it."""
        return self.sample(self.forward(step))

    @torch.inference_mode()
    def forward(self, step: SchedulerOutput) -> Forward:
        """Queue the step's forward pass. Inputs sampled by the previous launch and not yet collected are read
        from the device."""
        rows = step.rows
        size = None
        if self.graphs is not None and not step.prefills and not reports_prompt_logprobs(rows):  # graphs: no hidden
            size = self.graphs.padded_size(len(rows))
        ids, positions, meta, sample_rows = self.inputs.prepare(rows, pad_to=size, pending=self._last_sampled)
        self._last_sampled = None
        sampling = [row for row in rows if row.sample]
        if not sampling:
            return Forward(step, [], None, queue_prompt_logprobs(self.model, self.model(ids, positions, meta), rows))
        prompt = None
        if size is not None:
            logits = self.graphs.replay(size)
            # a decode step samples every row, in order: a view instead of a gather over [rows, vocab]
            logits = logits[: len(rows)] if len(sampling) == len(rows) else logits[sample_rows]
        else:
            hidden = self.model(ids, positions, meta)
            prompt = queue_prompt_logprobs(self.model, hidden, rows)
            logits = self.model.compute_logits(hidden[sample_rows])
        return Forward(step, sampling, logits, prompt)

    @torch.inference_mode()
    def sample(self, forward: Forward, bitmask: torch.Tensor | None = None) -> LaunchedStep:
        """Queue the sampling of a forward pass's rows; bitmask (host int32 [rows, words]) masks their logits
        (structured output)."""
        if forward.logits is None:
            return LaunchedStep(forward.step, None, forward.prompt_logprobs)
        sampling = forward.sampling
        mask = None if bitmask is None else bitmask.to(self.device, non_blocking=True)
        pending = self.sampler.sample(forward.logits, sampling_tensors(sampling, self.device, self.vocab_size), mask)
        self._last_sampled = (pending.token_ids, {row.request_id: i for i, row in enumerate(sampling)})
        return LaunchedStep(forward.step, pending, forward.prompt_logprobs)

    def collect(self, step: LaunchedStep) -> tuple[list[int | None], list]:
        """Wait for a launched step's tokens: per row, the token (or None) and its logprobs entry."""
        rows = step.output.rows
        if step.sample is None:
            return [None] * len(rows), [None] * len(rows)
        out: SamplerOutput = step.sample.result()
        tokens, logprobs = iter(out.token_ids), iter(out.logprobs or [None] * len(out.token_ids))
        sampled = [next(tokens) if row.sample else None for row in rows]
        entries = [next(logprobs) if row.sample else None for row in rows]
        return sampled, entries
