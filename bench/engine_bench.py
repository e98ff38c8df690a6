"""`kvgate bench engine`'s measurement: the engine core driven in this process (no HTTP, no detokenization), as
TGI's text-generation-benchmark drives its shards.

For each batch size B and each run: B requests of `prompt_len` random token ids (shifted by one more per run, so
the prefix cache never serves a prompt), ignore_eos, max_tokens = decode_len + 1, submitted at once to
`EngineCore`, whose `step()` is then called until they finish. The clock (`time.perf_counter`) is read once after
each `step()` returns, and nothing else happens per token:

- prefill: from just before the B requests are submitted to the return of the step that delivers the last of
  their first tokens: every prompt step (B * prompt_len past max_num_batched_tokens takes several: chunked
  prefill), and the sampling of the first tokens.
- decode: each later step that delivers one new token to every one of the B sequences gives one sample, the time
  since the step before returned. Steps that deliver fewer (after a chunked prefill, the requests whose prompts
  finished first run ahead and finish first) are counted, not sampled.

`step()` returns only once the tokens it delivers are on the host (the core waits for the device's sampled
tokens), so device work is inside the time. With async_scheduling (the server's default) the core overlaps: each
step() schedules and launches the next step before it collects the one in flight, so the time between two
deliveries is the steady-state time per step, what a server's user sees between tokens. With
--no-async-scheduling each step runs end to end (schedule, run, wait, update) and is timed so. On the CPU a launch
computes its step before returning, so nothing overlaps and the overlapped loop would only shift the time by a
step (the first decode step counted in the prefill): there the plain loop is measured, and a note says so.
"""

from __future__ import annotations

import dataclasses
import gc
import random
import resource
import time
from dataclasses import dataclass

import msgspec

from bench.stats import summary
from bench.workloads import shifted
from engine.config import EngineConfig
from engine.core import EngineCore, model_max_len
from engine.model_runner import resolve_device
from engine.model_source import read_model_config, resolve_model
from engine.protocol import AddRequest
from engine.sampling_params import SamplingParams, StructuredOutputsParams


@dataclass
class Settings:
    batch_sizes: list[int]
    prompt_len: int = 512
    decode_len: int = 256
    runs: int = 3
    warmups: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    prompt_seed: int = 0  # of the random prompt token ids
    json_schema: dict | None = None  # structured output: every request constrained to it

    def params(self) -> SamplingParams:
        structured = None if self.json_schema is None else StructuredOutputsParams(json=self.json_schema)
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.decode_len + 1, ignore_eos=True, detokenize=False,
                              structured_outputs=structured)


@dataclass
class RunTimes:
    """One run of one batch size."""
    prefill_s: float
    prefill_steps: int
    decode_s: list[float]  # one per full decode step
    partial_steps: int  # steps after the prefill that delivered tokens to fewer than the batch


class BenchSetupError(ValueError):
    """Settings the engine cannot run (the command shows the message)."""


def engine_config_for(config: EngineConfig, settings: Settings) -> tuple[EngineConfig, list[str]]:
    """The EngineConfig to benchmark: the model resolved, the core in this process, and room for the largest batch
    (max_num_seqs and max_num_batched_tokens raised to it where smaller: a batch size the engine could not hold
    in one step would measure something else). Returns it and notes saying what was changed. Checks that the
    prompt and decode lengths fit the model's context before any weights are loaded."""
    notes = []
    largest = max(settings.batch_sizes)
    model_dir = resolve_model(config.model, config.load_format, config.tokenizer)  # ModelNotFoundError: ValueError
    try:
        max_len = model_max_len(read_model_config(model_dir), config.max_model_len)
    except ValueError as exc:
        raise BenchSetupError(str(exc)) from exc
    needed = settings.prompt_len + settings.decode_len + 1
    if needed > max_len:
        raise BenchSetupError(f"--prompt-len {settings.prompt_len} + --decode-len {settings.decode_len} + 1 (the "
                              f"first token) = {needed} tokens exceeds the model's context of {max_len} tokens "
                              f"(max_model_len)")
    changes = {"model": str(model_dir), "in_process": True}
    if config.async_scheduling and resolve_device(config.device).type == "cpu":
        changes["async_scheduling"] = False
        notes.append("CPU: the plain step loop is measured (async_scheduling off): a CPU launch runs its step before "
                     "returning, so the overlapped loop would count the first decode step in the prefill")
    if config.max_num_seqs < largest:
        changes["max_num_seqs"] = largest
        notes.append(f"max_num_seqs raised from {config.max_num_seqs} to {largest}, the largest batch size")
    if config.max_num_batched_tokens < largest:
        changes["max_num_batched_tokens"] = largest
        notes.append(f"max_num_batched_tokens raised from {config.max_num_batched_tokens} to {largest}, so that a "
                     f"decode step holds the largest batch")
    return dataclasses.replace(config, **changes), notes


class EngineBench:
    """One engine core, measured batch size after batch size."""

    def __init__(self, config: EngineConfig, settings: Settings) -> None:
        self.settings = settings
        self.config = config
        self.core = EngineCore(config)
        runner = self.core.runner
        self.cuda = runner.device.type == "cuda"
        self.vocab_size = self.core.info.vocab_size
        self.weights_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        self.kv_bytes = sum(t.numel() * t.element_size() for layer in runner.model.attention_layers()
                            for t in (layer.k_cache, layer.v_cache))
        self.kv_tokens = runner.max_batch_total_tokens
        self.step_loop = "overlapped" if config.async_scheduling else "plain"
        self._offset = 0  # token-id shift of the next run: every run's prompts are new to the prefix cache

    @property
    def info(self) -> dict:
        return {**msgspec.structs.asdict(self.core.info), "step_loop": self.step_loop}

    def kv_note(self, batch_size: int) -> str | None:
        need = batch_size * (self.settings.prompt_len + self.settings.decode_len + 1)
        if need <= self.kv_tokens:
            return None
        return (f"batch {batch_size} needs {need} tokens of KV cache, the cache holds {self.kv_tokens}: requests are "
                f"preempted and recomputed, and its figures include that (see its preemptions)")

    def prompts(self, batch_size: int) -> list[list[int]]:
        rng = random.Random(self.settings.prompt_seed + batch_size)
        return [[rng.randrange(self.vocab_size) for _ in range(self.settings.prompt_len)] for _ in range(batch_size)]

    def measure(self, batch_size: int, on_run=None) -> dict:
        """Warm-ups, then the timed runs, of one batch size; returns its level. on_run(kind, index, times) is
        called after each run ("warmup" or "run")."""
        base = self.prompts(batch_size)
        core = self.core
        preemptions, hits = core.scheduler.num_preemptions, core.block_manager.num_hits
        self._reset_peak()
        started = time.perf_counter()
        timed: list[RunTimes] = []
        for kind, count in (("warmup", self.settings.warmups), ("run", self.settings.runs)):
            for index in range(count):
                times = self.run_once(shifted(base, self._next_offset(), self.vocab_size), f"b{batch_size}-{kind}"
                                      f"{index}")
                if kind == "run":
                    timed.append(times)
                if on_run is not None:
                    on_run(kind, index, times)
        wall = time.perf_counter() - started
        return self.level(batch_size, timed, wall, core.scheduler.num_preemptions - preemptions,
                          core.block_manager.num_hits - hits)

    def _next_offset(self) -> int:
        self._offset += 1
        return self._offset

    def run_once(self, prompts: list[list[int]], tag: str) -> RunTimes:
        """Submit the prompts at once and step the core until they finish; the clock is read once per step."""
        core, batch = self.core, len(prompts)
        params = self.settings.params()
        step, clock = core.step, time.perf_counter
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        start = clock()
        for i, prompt in enumerate(prompts):
            core.add_request(AddRequest(f"{tag}-{i}", prompt, params, 0.0))
        firsts = steps = 0
        while firsts < batch:
            if not core.has_work():
                raise RuntimeError(f"the engine finished {tag} with {batch - firsts} requests lacking a first token")
            updates = step().updates
            steps += 1
            firsts += sum(1 for u in updates if u.first_scheduled_time is not None)  # set on a first token only
        last = clock()
        prefill = last - start
        decode, partial = [], 0
        while core.has_work():
            delivered = len(step().updates)
            now = clock()
            if delivered == batch:
                decode.append(now - last)
            elif delivered:
                partial += 1
            last = now
        return RunTimes(prefill, steps, decode, partial)

    def level(self, batch_size: int, runs: list[RunTimes], wall_s: float, preemptions: int, hits: int) -> dict:
        prompt_tokens = batch_size * self.settings.prompt_len
        prefill = [r.prefill_s for r in runs]
        decode = [s for r in runs for s in r.decode_s]
        return {
            "batch_size": batch_size,
            "runs": len(runs),
            "prompt_tokens_per_run": prompt_tokens,
            "prefill": {
                "latency_s": summary(prefill),
                "tokens_per_s": summary(prompt_tokens / s for s in prefill),
                "steps_per_run": [r.prefill_steps for r in runs],
                "samples_s": prefill,
            },
            "decode": {
                "latency_s": summary(decode),  # per step: one token for each of the batch's sequences
                "tokens_per_s": summary(batch_size / s for s in decode),
                "overall_tokens_per_s": batch_size * len(decode) / sum(decode) if decode else None,
                "steps_per_run": [len(r.decode_s) for r in runs],
                "partial_steps_per_run": [r.partial_steps for r in runs],
                "samples_s": decode,
            },
            "memory": self.memory(),
            "preemptions": preemptions,
            "prefix_cache_hit_tokens": hits,
            "wall_s": wall_s,
        }

    # -- memory ---------------------------------------------------------------------------------------------
    def _reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.core.runner.device)
        else:
            _reset_rss_peak()

    def memory(self) -> dict:
        """Weights, the KV pool and what the batch took on top of them. CUDA: the allocator's peak since the batch
        started, less weights and KV (activations, CUDA-graph pools, sampling buffers), and free device memory.
        CPU: the process's resident set (now, and its peak since the batch started where Linux lets it be reset),
        since the CPU allocator keeps no count."""
        memory = {"kind": "cuda" if self.cuda else "cpu", "weights_bytes": self.weights_bytes,
                  "kv_cache_bytes": self.kv_bytes, "kv_cache_tokens": self.kv_tokens}
        if self.cuda:
            import torch

            device = self.core.runner.device
            peak = torch.cuda.max_memory_allocated(device)
            free, total = torch.cuda.mem_get_info(device)
            memory.update(peak_allocated_bytes=peak,
                          peak_activation_bytes=max(0, peak - self.weights_bytes - self.kv_bytes),
                          free_device_bytes=free, total_device_bytes=total, rss_bytes=None, peak_rss_bytes=None)
        else:
            rss, peak = _rss()
            memory.update(peak_allocated_bytes=None, peak_activation_bytes=None, free_device_bytes=None,
                          total_device_bytes=None, rss_bytes=rss, peak_rss_bytes=peak)
        return memory


def _rss() -> tuple[int | None, int]:
    """(resident set now, its peak) in bytes: /proc/self/status where there is one, else getrusage's peak."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_rss_peak() -> None:
    """Linux resets the resident-set peak (VmHWM) when "5" is written to /proc/self/clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
