"""EngineCore: schedule, run the model, update — one step at a time. Token ids in, token ids out.

The loop is chosen once, at start: with async_scheduling the overlapped one, where step N+1 is scheduled and
launched before step N's tokens are read back, so the host's work (scheduling, inputs, outputs) hides behind
the device's and each step() returns the previous step's tokens (it waits first while a running request needs
its own tokens on the host: penalties); without, the plain one: schedule, run, update.

`run_engine_core` is the step loop of the core's own process: it drains requests between steps and sends one
message per step, so HTTP, JSON and detokenization in the front end never compete with scheduling.
"""

from __future__ import annotations

import functools
import logging
import signal
import traceback
from multiprocessing.connection import Connection

import msgspec

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.cpu_threads import CpuThreads
from engine.errors import InvalidRequestError
from engine.model_runner import Forward, LaunchedStep, ModelRunner
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
from engine.structured_output import StructuredOutput

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
        self.config = config
        self._aborted: list[RequestUpdate] = []
        self._in_flight: LaunchedStep | None = None  # the overlapped loop's launched, uncollected step
        self.step = self._step_overlapped if config.async_scheduling else self._step_plain

    def add_request(self, request: AddRequest) -> None:
        seed = request.params.seed
        generator = None if seed is None else self.runner.request_generator(seed)
        seq = Sequence(request.request_id, request.prompt_token_ids, request.params, request.arrival_time, generator)
        if request.params.structured_outputs is not None:
            try:
                seq.matcher = self.structured.matcher(request.params)
            except InvalidRequestError as exc:  # the front end compiles it first: only a different llguidance
                logger.error("request %s: %s", request.request_id, exc)
                self._aborted.append(RequestUpdate(request.request_id, [], finish_reason="abort"))
                return
        self.scheduler.add(seq)

    @functools.cached_property
    def structured(self) -> StructuredOutput:
        """Made at the first constrained request: llguidance's tokenizer takes about a second to build."""
        return StructuredOutput(self.config, self.info.vocab_size, self.runner.device, self.scheduler.max_num_seqs)

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

    def _step_plain(self) -> StepOutputs:
        """Schedule, run the model and wait for it, update."""
        updates, self._aborted = self._aborted, []
        output = self.scheduler.schedule()
        if output:
            forward = self.runner.forward(output)
            self._finish(self.runner.sample(forward, self._bitmask(forward)), updates)
        return StepOutputs(updates, self.stats())

    def _step_overlapped(self) -> StepOutputs:
        """Schedule and launch this step, then collect the one launched before while the device runs it."""
        updates, self._aborted = self._aborted, []
        if self._in_flight is not None and self._needs_host_tokens():
            self._finish(self._in_flight, updates)
            self._in_flight = None
        output = self.scheduler.schedule()
        launched = None
        if output:
            forward = self.runner.forward(output)
            if self._in_flight is not None and forward.constrained:
                # the masks follow the tokens still in flight: read them while the device runs the forward pass
                self._finish(self._in_flight, updates)
                self._in_flight = None
            launched = self.runner.sample(forward, self._bitmask(forward))
        if self._in_flight is not None:
            self._finish(self._in_flight, updates)
        self._in_flight = launched
        return StepOutputs(updates, self.stats())

    def _bitmask(self, forward: Forward):
        """The step's token masks, filled on the host while the device runs its forward pass; None when no row
        is constrained. A row whose request ended meanwhile samples freely: its token is dropped."""
        if not forward.constrained:
            return None
        matchers = []
        for row in forward.sampling:
            seq = self.scheduler.requests.get(row.request_id)
            matchers.append(seq.matcher if seq is not None and seq.token_ids is row.token_ids else None)
        return self.structured.bitmasks.fill(matchers)

    def _needs_host_tokens(self) -> bool:
        """Whether a running request's sampling reads its output tokens on the host (penalties)."""
        return any(seq.params.needs_penalties for seq in self.scheduler.running)

    def _finish(self, step: LaunchedStep, updates: list[RequestUpdate]) -> None:
        """Wait for a launched step's tokens, apply them, and add what changed to updates."""
        sampled, logprobs = self.runner.collect(step)
        prompt = step.prompt_logprobs.result() if step.prompt_logprobs is not None else {}
        for row, seq in self.scheduler.update(step.output, sampled):
            entry = logprobs[row]
            if sampled[row] is None and row not in prompt and not seq.is_finished:
                continue  # a prompt chunk whose logprobs were reported before a preemption
            updates.append(RequestUpdate(
                seq.request_id,
                [] if sampled[row] is None else [seq.token_ids[-1]],
                None if entry is None else [TokenLogprobs(*entry)],
                seq.finish_reason,
                seq.stop_reason,
                seq.num_cached_tokens,
                seq.first_scheduled_time if seq.num_output_tokens <= 1 else None,
                prompt.get(row),
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
    threads = CpuThreads.for_device(core.info.device)  # on the CPU: fewer threads while others hold its cores
    try:
        while True:
            if threads is not None:
                threads.adjust()
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
