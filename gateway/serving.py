"""Run OpenAI chat and completion requests on the engine: validate everything first (so a bad request fails
before any byte is streamed), then answer whole or as Server-Sent Events.

No HTTP here: the batch runner drives the same code and gets the same bodies."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from engine.errors import EngineDeadError, InvalidRequestError
from engine.llm import AsyncLLM, PreparedRequest
from engine.outputs import RequestOutput
from gateway.errors import APIError, from_exception, model_not_found
from gateway.limits import ServerLimits
from gateway.logprobs import TokenFormatter
from gateway.params import (
    chat_messages,
    chat_param,
    chat_params,
    completion_param,
    completion_params,
    completion_prompts,
)
from gateway.responses import DONE, ResponseBuilder, sse
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.tool_parsers import model_parser
from gateway.tools import tool_plan

OnFinished = Callable[[RequestOutput, int], None]  # a prompt's final output and its number of generated tokens
OnAborted = Callable[[str], None]  # a request that got no (whole) answer, by cause


@dataclass
class Job:
    """A validated request: its prepared prompts, the response builder, and what to echo."""
    builder: ResponseBuilder
    prompts: list[PreparedRequest]
    echo: list[str] | None = None
    stream: bool = False


try:
    VERSION = version("kvgate")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    VERSION = "0.0.0"


def default_model_name(model: str | None) -> str:
    """The name a model is served under: its directory or file name, a hub id or preset name as it is."""
    from engine.model_source import DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    path = Path(model)
    return path.stem if path.suffix in (".gguf", ".toml") else (path.name if path.exists() else model)


class Service:
    """model_names[0] is the name responses carry; with strict_model False a request may name any model (batch
    files written for the hosted API). limits: the server's (default: OpenAI's maxima). tool_call_parser: how
    the model writes tool calls (gateway/tool_parsers; `auto`: read from its chat template)."""

    def __init__(self, engine: AsyncLLM, model_names: list[str], *, on_finished: OnFinished | None = None,
                 on_aborted: OnAborted | None = None, strict_model: bool = True, limits: ServerLimits | None = None,
                 tool_call_parser: str = "auto") -> None:
        self.engine = engine
        self.model_names = model_names
        self.limits = limits or ServerLimits()
        info = engine.info
        self.fingerprint = "fp_" + hashlib.sha256(f"{VERSION}|{info.model_dir}|{info.dtype}".encode()).hexdigest()[:10]
        self.formatter = TokenFormatter(engine.tokenizer)
        self.on_finished = on_finished or (lambda out, tokens: None)
        self.on_aborted = on_aborted or (lambda cause: None)
        self.strict_model = strict_model
        self.tool_parser = model_parser(tool_call_parser, getattr(engine.tokenizer, "chat_template", None))

    def model_name(self, requested: str | None) -> str:
        if requested is None or requested in self.model_names or not self.strict_model:
            return self.model_names[0]
        raise model_not_found(requested)

    def _builder(self, kind: str, req, n: int, logprobs: int | None) -> ResponseBuilder:
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        skip = req.skip_special_tokens is not False
        builder = ResponseBuilder(kind, prefix + uuid.uuid4().hex, int(time.time()), self.model_name(req.model),
                                  self.fingerprint, self.formatter, n=n, logprobs=logprobs, skip_special=skip,
                                  include_usage=include_usage)
        builder.prompt_logprobs = req.prompt_logprobs
        return builder

    def chat_job(self, req: ChatCompletionRequest) -> Job:
        try:
            tools = tool_plan(req.tools, req.tool_choice, req.parallel_tool_calls)
            params = chat_params(req, self.limits, tools)
            builder = self._builder("chat", req, params.n, params.logprobs)
            builder.tools = tools.output(self.tool_parser, params.structured_outputs)
            prepared = self.engine.prepare_chat(chat_messages(req), params,
                                                tools.template_kwargs(req.chat_template_kwargs))
        except InvalidRequestError as exc:  # the engine names its own fields: name the chat request's
            exc.param = chat_param(req, exc.param)
            raise
        return Job(builder, [prepared], stream=bool(req.stream))

    def completion_job(self, req: CompletionRequest) -> Job:
        params = completion_params(req, self.limits)
        builder = self._builder("completion", req, params.n, params.logprobs)
        try:
            prepared = [self.engine.prepare(p, params) for p in completion_prompts(req.prompt)]
        except InvalidRequestError as exc:  # a grammar the engine cannot compile: name the request's field
            exc.param = completion_param(req, exc.param)
            raise
        echo = None
        if req.echo:
            echo = [p.text if p.text is not None else self.engine.tokenizer.decode(p.prompt_token_ids)
                    for p in prepared]
        return Job(builder, prepared, echo, stream=bool(req.stream))

    async def respond(self, job: Job) -> dict:
        b = job.builder
        tasks = [asyncio.ensure_future(self.engine.complete(p, request_id=f"{b.id}-{i}"))
                 for i, p in enumerate(job.prompts)]
        try:
            outputs = await asyncio.gather(*tasks)
            for out in outputs:
                _check_not_aborted(out)
        except asyncio.CancelledError:  # the route cancels when the client leaves
            self.on_aborted("client_disconnect")
            raise
        except (EngineDeadError, APIError) as exc:
            _count_abort(self.on_aborted, exc)
            raise
        finally:
            for task in tasks:
                task.cancel()  # one failed or the client left: abort the others
        for out in outputs:
            self.on_finished(out, sum(len(c.token_ids) for c in out.outputs))
        return b.response(outputs, job.echo)

    async def stream(self, job: Job) -> AsyncIterator[bytes]:
        """SSE events; errors after the first byte become an error event, and the stream always ends [DONE]."""
        b = job.builder
        finals: dict[int, RequestOutput] = {}
        generated = [0] * len(job.prompts)
        ended: set[int] = set()  # choices whose last chunk (the one with finish_reason) was sent
        try:
            for p in range(len(job.prompts)):
                for i in range(b.n):
                    if b.kind == "chat":
                        yield b.role_chunk(p * b.n + i)
                    elif job.echo and b.logprobs is None:  # with logprobs: once the prompt's are computed (below)
                        yield b.echo_chunk(p * b.n + i, job.echo[p])
            async for p, out in _merged([self.engine.generate(prep, request_id=f"{b.id}-{i}", delta=True)
                                         for i, prep in enumerate(job.prompts)]):
                if job.echo and b.logprobs is not None and out.prompt_logprobs is not None:  # before any token
                    for i in range(b.n):
                        yield b.echo_chunk(p * b.n + i, job.echo[p], out)
                for c in out.outputs:
                    index = p * b.n + c.index
                    if index in ended:
                        continue  # a delta repeats a finished completion (its siblings still run): sent already
                    generated[p] += len(c.token_ids)
                    if c.text or c.token_ids or c.finish_reason:
                        if c.finish_reason == "abort":
                            _check_not_aborted(out)
                        yield b.delta_chunk(index, c)
                    if c.finish_reason is not None:
                        ended.add(index)
                if out.finished:
                    finals[p] = out
                    self.on_finished(out, generated[p])
            if b.include_usage:
                yield b.usage_chunk([finals[p] for p in sorted(finals)], sum(generated))
        except (GeneratorExit, asyncio.CancelledError):  # closed or cancelled before its end: the client left
            if len(finals) < len(job.prompts):
                self.on_aborted("client_disconnect")
            raise
        except Exception as exc:
            _count_abort(self.on_aborted, exc)
            yield sse(from_exception(exc).body())
        yield DONE


def _count_abort(on_aborted: OnAborted, exc: Exception) -> None:
    """Counted as aborts: the engine died, or the server shut down (_check_not_aborted); not other errors."""
    if isinstance(exc, EngineDeadError):
        on_aborted("engine_dead")
    elif isinstance(exc, APIError) and exc.code == "aborted":
        on_aborted("shutdown")


def _check_not_aborted(out: RequestOutput) -> None:
    if any(c.finish_reason == "abort" for c in out.outputs):
        raise APIError(503, "The request was aborted: the server is shutting down.", code="aborted")


async def _merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, item) from several async iterators as items arrive; closing this closes (aborts) them all."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
        except Exception as exc:
            queue.put_nowait((i, exc))
        queue.put_nowait((i, end))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
