"""The public front end: `LLM` (offline, synchronous) and `AsyncLLM` (streaming, abortable).

Both tokenize and validate here, send token ids to the engine core, and turn its per-step token ids back into
text. The core runs in its own process unless `in_process=True`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from typing import NamedTuple

from tqdm.auto import tqdm

from engine.client import start_client
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.errors import EngineDeadError
from engine.model_source import resolve_model
from engine.output_processor import OutputProcessor, RequestState
from engine.outputs import RequestOutput
from engine.processor import InputProcessor, Prompt, eos_token_ids
from engine.protocol import AbortRequests, AddRequest, SchedulerStats, StepOutputs
from engine.sampling_params import SamplingParams


class PreparedRequest(NamedTuple):
    """A validated request: prompt text (None for token ids), prompt ids, the params of each of its n."""
    text: str | None
    prompt_token_ids: list[int]
    children: list[SamplingParams]

Params = SamplingParams | Seq[SamplingParams] | None  # one for all prompts, or one per prompt


class _Frontend:
    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, core_class: type | None = None,
                 **engine_args) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        config = config or EngineConfig(model=model, **engine_args)
        model_dir = resolve_model(config.model, config.load_format, config.tokenizer)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or model_dir)
        try:
            generation_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:
            generation_config = None
        self.config = dataclasses.replace(config, model=str(model_dir))
        self.client = start_client(self.config, core_class or EngineCore)
        self.info = self.client.info
        self.processor = InputProcessor(self.tokenizer, self.info, eos_token_ids(self.tokenizer, generation_config))
        self.output_processor = OutputProcessor(self.tokenizer)
        self.last_stats = SchedulerStats()

    def prepare(self, prompt: Prompt | PreparedRequest, params: SamplingParams | None = None) -> PreparedRequest:
        """Validate one request without running it (raises InvalidRequestError / ContextTooLongError), so a
        server can reject it, or a batch of them, before answering anything. A prepared request is returned as
        it is: each request is prepared once."""
        if isinstance(prompt, PreparedRequest):
            return prompt
        text, ids = self.processor.tokenize(prompt)
        return PreparedRequest(text, ids, self.processor.prepare_params(ids, params or SamplingParams()))

    def prepare_chat(self, messages: list[dict], params: SamplingParams | None = None,
                     chat_template_kwargs: dict | None = None) -> PreparedRequest:
        """prepare() for a conversation: the chat template applied, its text tokenized once."""
        text = self.chat_prompt(messages, chat_template_kwargs)
        ids = self.tokenize_chat(text)
        return PreparedRequest(text, ids, self.processor.prepare_params(ids, params or SamplingParams()))

    def _submit(self, request_id: str, text: str | None, ids: list[int], children: list[SamplingParams]) -> None:
        now = time.time()
        core_ids = self.output_processor.add(request_id, text, ids, children, now)
        for core_id, child in zip(core_ids, children):
            self.client.send(AddRequest(core_id, ids, child, now))

    def _process(self, step: StepOutputs) -> list[RequestState]:
        self.last_stats = step.stats
        changed, to_abort = self.output_processor.process(step.updates)
        if to_abort:
            self.client.send(AbortRequests(to_abort))
        return changed

    def _abort(self, request_id: str) -> RequestOutput | None:
        core_ids, final = self.output_processor.abort(request_id)
        if core_ids:
            self.client.send(AbortRequests(core_ids))
        return final

    def chat_prompt(self, messages: list[dict], chat_template_kwargs: dict | None = None) -> str:
        return self.processor.apply_chat_template(messages, **(chat_template_kwargs or {}))

    def tokenize_chat(self, prompt: str) -> list[int]:
        # the template already holds any BOS it wants: adding special tokens again would double it
        return self.processor.tokenize(prompt, add_special_tokens=False)[1]

    def shutdown(self) -> None:
        self.client.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class LLM(_Frontend):
    """Offline inference: hand it all prompts, get all outputs back in order."""

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: Params = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        return self._run([self.prepare(p, sp) for p, sp in zip(prompts, _per_prompt(sampling_params, len(prompts)))],
                         use_tqdm)

    def chat(self, messages: list[dict] | Seq[list[dict]], sampling_params: Params = None,
             use_tqdm: bool = True, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        requests = [self.prepare_chat(conversation, sp, chat_template_kwargs)
                    for conversation, sp in zip(conversations, _per_prompt(sampling_params, len(conversations)))]
        return self._run(requests, use_tqdm)

    def _run(self, requests: list[PreparedRequest], use_tqdm: bool) -> list[RequestOutput]:
        """Submit every (validated) request, then step until all are finished."""
        ids = [uuid.uuid4().hex for _ in requests]
        for request_id, request in zip(ids, requests):
            self._submit(request_id, *request)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm, unit="req")
        try:
            while len(results) < len(ids):
                step = self.client.get_outputs()
                if step is None:
                    raise EngineDeadError("the engine stopped")
                for state in self._process(step):
                    if state.finished:  # offline: no partial outputs to build
                        results[state.request_id] = state.output()
                        bar.update(1)
        finally:
            bar.close()
            for request_id in ids:
                if request_id not in results:
                    self._abort(request_id)
        return [results[i] for i in ids]


class _Stream:
    """What one request's consumer waits on. Steps only mark it ready; the consumer builds one output per wake,
    so a reader that falls behind gets several steps' tokens in one output instead of a growing backlog."""

    __slots__ = ("state", "ready", "error", "offsets", "final_only", "sent_prompt_logprobs")

    def __init__(self, state: RequestState, final_only: bool = False) -> None:
        self.state = state
        self.final_only = final_only  # woken only when the request ends (complete())
        self.ready = asyncio.Event()
        self.error: Exception | None = None
        self.offsets = [(0, 0)] * len(state.completions)
        self.sent_prompt_logprobs = False

    def take(self, delta: bool) -> RequestOutput:
        if not delta:
            return self.state.output()
        out = self.state.output(self.offsets)
        self.offsets = [(a + len(o.text), b + len(o.token_ids)) for (a, b), o in zip(self.offsets, out.outputs)]
        if self.sent_prompt_logprobs:  # deltas carry prompt logprobs once, on the first output they are complete in
            out.prompt_logprobs = None
        self.sent_prompt_logprobs = out.prompt_logprobs is not None or self.sent_prompt_logprobs
        return out


class AsyncLLM(_Frontend):
    """Streaming front end for the gateway and the batch runner: `generate` yields an output whenever a
    request has news — cumulative, or with `delta=True` only the text, tokens and logprobs that are new."""

    def __init__(self, model: str | None = None, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: Exception | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.on_dead: Callable[[EngineDeadError], None] | None = None  # told once, on the event loop

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead

    @property
    def is_running(self) -> bool:
        return self._dead is None and not self._stopping

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def generate(self, prompt: Prompt | PreparedRequest, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, *, delta: bool = False) -> AsyncIterator[RequestOutput]:
        request_id, stream = self._start(prompt, sampling_params, request_id)
        try:
            while True:
                await stream.ready.wait()
                stream.ready.clear()
                if stream.error is not None:
                    raise stream.error
                out = stream.take(delta)
                yield out
                if out.finished:
                    return
        finally:
            if self._streams.pop(request_id, None) is not None and self._dead is None:
                self._abort(request_id)  # the consumer left early (client disconnect, cancellation)

    async def complete(self, prompt: Prompt | PreparedRequest, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> RequestOutput:
        """The finished output only (built once, not per step); cancelling the call aborts the request."""
        request_id, stream = self._start(prompt, sampling_params, request_id, final_only=True)
        try:
            while not stream.state.finished:
                await stream.ready.wait()
                stream.ready.clear()
                if stream.error is not None:
                    raise stream.error
            return stream.take(delta=False)
        finally:
            if self._streams.pop(request_id, None) is not None and self._dead is None:
                self._abort(request_id)

    def _start(self, prompt, params, request_id, final_only: bool = False) -> tuple[str, _Stream]:
        self._ensure_output_thread()
        if self._dead:
            raise self._dead
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        self._submit(request_id, *self.prepare(prompt, params))
        stream = self._streams[request_id] = _Stream(self.output_processor.requests[request_id], final_only)
        return request_id, stream

    async def abort(self, request_id: str) -> None:
        """End a request now; its stream ends with finish_reason "abort"."""
        self._abort(request_id)
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.ready.set()

    async def abort_all(self) -> None:
        """End every request in flight (a server shutting down); each stream ends with finish_reason "abort"."""
        for request_id in list(self._streams):
            await self.abort(request_id)

    def watch(self) -> None:
        """Receive outputs from now on, on the running loop: a core that dies while idle is noticed at once."""
        self._ensure_output_thread()

    def _ensure_output_thread(self) -> None:
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self._loop = loop
            self._thread = threading.Thread(target=self._output_loop, name="kvgate-outputs", daemon=True)
            self._thread.start()
        elif loop is not self._loop:
            # Outputs are delivered to the first loop only: a request from another one would wait forever.
            raise RuntimeError("this AsyncLLM is bound to the event loop it first ran in; "
                               "create one AsyncLLM per event loop")

    def _output_loop(self) -> None:
        """Receive one message per engine step and hand it to the event loop, which owns all request state."""
        try:
            while (step := self.client.get_outputs()) is not None:
                self._loop.call_soon_threadsafe(self._on_step, step)
        except Exception as exc:
            if not self._stopping:
                self._loop.call_soon_threadsafe(self._on_dead, exc)

    def _on_step(self, step: StepOutputs) -> None:
        for state in self._process(step):
            stream = self._streams.get(state.request_id)
            if stream is not None and (state.finished or not stream.final_only):
                stream.ready.set()

    def _on_dead(self, exc: Exception) -> None:
        self._dead = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"engine failed: {exc}")
        for stream in self._streams.values():
            stream.error = self._dead
            stream.ready.set()
        self._streams.clear()
        if self.on_dead is not None:
            self.on_dead(self._dead)

    def shutdown(self) -> None:
        self._stopping = True
        super().shutdown()
        if self._thread is not None and self._thread is not threading.current_thread():
            # an in-process core may be mid-step on that thread: exiting under it aborts the interpreter
            self._thread.join(timeout=10)


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _per_prompt(params, count: int) -> list[SamplingParams | None]:
    if params is None or isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"sampling_params has {len(params)} entries for {count} prompts")
    return params
