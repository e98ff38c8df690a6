"""EngineCore: schedule, run the model, update — one step at a time. Token ids in, token ids out.

With async_scheduling, step N+1 is scheduled and launched before step N's tokens are read back, so the host's
work (scheduling, inputs, outputs) hides behind the device's: each step() returns the previous step's tokens.
It falls back to waiting first while a running request needs its own tokens on the host (penalties).

`run_engine_core` is the step loop of the core's own process: it drains requests between steps and sends one
message per step, so HTTP, JSON and detokenization in the front end never compete with scheduling.
"""

from __future__ import annotations

import logging
import signal
import traceback
from multiprocessing.connection import Connection

import msgspec
import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.model_runner import LaunchedStep, ModelRunner
from engine.model_source import read_model_config
from engine.protocol import (
    AbortRequests,
    AddRequest,
    EngineFailure,
    EngineInfo,
    FromCore,
    RequestUpdate,
    SchedulerStats,
    Shutdown,
    StepOutputs,
    ToCore,
    TokenLogprobs,
)
from engine.scheduler import Scheduler
from engine.sequence import Sequence

logger = logging.getLogger("kvgate")


def model_max_len(hf_config, requested: int | None) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    if getattr(hf_config, "sliding_window", None) and getattr(hf_config, "use_sliding_window", True):
        limit = min(limit, hf_config.sliding_window)  # no sliding-window attention yet: stay inside the window
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's maximum context length {limit}")
    return requested


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        hf_config = read_model_config(config.model)
        self.max_model_len = model_max_len(hf_config, config.max_model_len)
        self.runner = ModelRunner(config, hf_config, config.model, self.max_model_len)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, self.runner.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len)
        self.info = EngineInfo(
            model_dir=str(config.model),
            dtype=str(self.runner.dtype).removeprefix("torch."),
            device=str(self.runner.device),
            max_model_len=self.max_model_len,
            num_kv_blocks=self.runner.num_kv_blocks,
            block_size=self.runner.block_size,
            vocab_size=hf_config.vocab_size,
            max_batch_total_tokens=self.runner.max_batch_total_tokens,
        )
        self._aborted: list[RequestUpdate] = []
        self.async_scheduling = config.async_scheduling
        self._in_flight: LaunchedStep | None = None

    def add_request(self, request: AddRequest) -> None:
        seq = Sequence(request.request_id, request.prompt_token_ids, request.params, request.arrival_time)
        if request.params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device)
            seq.generator.manual_seed(request.params.seed)
        self.scheduler.add(seq)

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self.scheduler.abort(request_id) is not None:
                self._aborted.append(RequestUpdate(request_id, [], finish_reason="abort"))

    def handle(self, message: ToCore) -> bool:
        """Apply one message from the front end; False when it asks the core to stop."""
        if isinstance(message, AddRequest):
            self.add_request(message)
        elif isinstance(message, AbortRequests):
            self.abort(message.request_ids)
        elif isinstance(message, Shutdown):
            return False
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborted) or self._in_flight is not None

    def step(self) -> StepOutputs:
        updates, self._aborted = self._aborted, []
        if self._in_flight is not None and self._needs_host_tokens():
            self._finish(self._in_flight, updates)
            self._in_flight = None
        batch = self.scheduler.schedule()
        launched = None
        if batch:
            launched = self.runner.launch(batch)
            self.scheduler.advance(batch)
        if self._in_flight is not None:  # the device is busy with `launched` meanwhile
            self._finish(self._in_flight, updates)
        self._in_flight = launched if self.async_scheduling else None
        if launched is not None and not self.async_scheduling:
            self._finish(launched, updates)
        return StepOutputs(updates, self.stats())

    def _needs_host_tokens(self) -> bool:
        """Whether a running request's sampling reads its output tokens on the host (penalties)."""
        return any(seq.params.needs_penalties for seq in self.scheduler.running)

    def _finish(self, step: LaunchedStep, updates: list[RequestUpdate]) -> None:
        """Wait for a launched step's tokens, apply them, and add what changed to updates."""
        sampled, logprobs = self.runner.collect(step)
        finished_before = [seq.is_finished for seq in step.batch.seqs]
        self.scheduler.update(step.batch, sampled)
        for seq, token, entry, dropped in zip(step.batch.seqs, sampled, logprobs, finished_before):
            if token is None or dropped:
                continue  # still prefilling, or the request ended while the step ran
            updates.append(RequestUpdate(
                seq.request_id,
                [token],
                None if entry is None else [TokenLogprobs(*entry)],
                seq.finish_reason,
                seq.stop_reason,
                seq.num_cached_tokens,
                seq.first_scheduled_time if seq.num_output_tokens == 1 else None,
            ))

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.usage(),
                              self.scheduler.num_preemptions, bm.num_queries, bm.num_hits)


def run_engine_core(config: EngineConfig, conn: Connection, log_level: int = logging.WARNING,
                    core_class: type = EngineCore) -> None:
    """Entry point of the core process; logs at the front end's level."""
    # A terminal's Ctrl-C signals the whole foreground process group: the front end decides what it means (stop
    # one chat reply, drain a server) and stops the core with Shutdown, or the pipe closing when it exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s kvgate-core: %(message)s")
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ToCore)
    try:
        core = core_class(config)
    except Exception as exc:  # report load failures to the front end instead of dying silently
        conn.send_bytes(encoder.encode(EngineFailure(type(exc).__name__, str(exc))))
        return
    conn.send_bytes(encoder.encode(core.info))
    try:
        while True:
            if not core.has_work() and not core.handle(decoder.decode(conn.recv_bytes())):
                return
            while conn.poll():
                if not core.handle(decoder.decode(conn.recv_bytes())):
                    return
            conn.send_bytes(encoder.encode(core.step()))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the front end went away
    except Exception as exc:
        logger.error("engine core failed:\n%s", traceback.format_exc())
        try:
            conn.send_bytes(encoder.encode(EngineFailure(type(exc).__name__, str(exc))))
        except OSError:
            pass


FROM_CORE_DECODER = msgspec.msgpack.Decoder(FromCore)
