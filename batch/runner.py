"""Push batch records through the engine, keeping it full, and write one output line per record in input order.

In-flight work is bounded: a record takes a slot when it is submitted and gives it back only when its line is
written, so requests in the engine, finished lines waiting for an earlier one, and memory all stay bounded
however long the input. The response bodies come from the gateway's own Service: a line gets exactly what the
HTTP server would answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from batch.inputs import CHAT_URL, Record
from batch.outputs import OutputFile
from gateway.errors import APIError, bad_request, from_exception
from gateway.fields import UnknownFields
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.serving import Service


@dataclass
class Summary:
    lines: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    unknown_fields: dict[str, int] = field(default_factory=dict)  # ignored body fields: lines that had each

    def text(self) -> str:
        rate = self.completion_tokens / self.wall_s if self.wall_s else 0.0
        ignored = "".join(f"; ignored unknown field {name!r} in {n} line(s)"
                          for name, n in sorted(self.unknown_fields.items()))
        return (f"{self.lines} lines ({self.lines - self.failed} done, {self.failed} failed), "
                f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens in {self.wall_s:.1f} s: "
                f"{rate:.1f} output tokens/s, {self.lines / self.wall_s if self.wall_s else 0.0:.2f} lines/s"
                f"{ignored}")


Line = Callable[[str, dict | None, APIError | None], dict]


class BatchRunner:
    def __init__(self, service: Service, make_line: Line, defaults: dict | None = None, max_in_flight: int = 512):
        self.service = service
        self.make_line = make_line
        self.defaults = defaults or {}
        self.max_in_flight = max_in_flight
        self.unknown = UnknownFields()  # each unknown body field logged once, counted for the summary

    async def answer(self, record: Record) -> tuple[dict | None, APIError | None]:
        """(response body, None) or (None, the error the gateway would give)."""
        if record.error is not None:
            return None, record.error
        try:
            body = {"model": self.service.model_names[0], **self.defaults, **record.body}
            if body.get("stream"):
                raise bad_request("stream is not supported in a batch: each line gets one whole response", "stream")
            struct = ChatCompletionRequest if record.url == CHAT_URL else CompletionRequest
            req = msgspec.convert(body, struct)
            self.unknown.check_keys(body.keys(), struct, record.url)
            job = self.service.chat_job(req) if struct is ChatCompletionRequest else self.service.completion_job(req)
            return await self.service.respond(job), None
        except Exception as exc:  # every failure is this line's answer; the run goes on
            return None, from_exception(exc)

    async def run(self, records: Iterable[Record], out: OutputFile, on_line=None) -> Summary:
        summary, start = Summary(), time.perf_counter()
        slots = asyncio.Semaphore(self.max_in_flight)
        order: asyncio.Queue = asyncio.Queue()  # answers in input order; its length is bounded by the slots

        async def write_in_order() -> None:
            while (item := await order.get()) is not None:
                record, task = item
                body, error = await task
                out.write(self.make_line(record.custom_id, body, error))
                slots.release()
                summary.lines += 1
                summary.failed += error is not None
                if body is not None:
                    summary.prompt_tokens += body["usage"]["prompt_tokens"]
                    summary.completion_tokens += body["usage"]["completion_tokens"]
                if on_line is not None:
                    on_line(summary)

        writer = asyncio.ensure_future(write_in_order())
        try:
            for record in records:
                await slots.acquire()
                if writer.done():
                    break  # the writer failed (disk full, closed output): stop submitting
                order.put_nowait((record, asyncio.ensure_future(self.answer(record))))
            order.put_nowait(None)
            await writer
        finally:
            writer.cancel()
            while not order.empty():  # interrupted: abort what was submitted and not written
                item = order.get_nowait()
                if item is not None:
                    item[1].cancel()
        summary.wall_s = time.perf_counter() - start
        for (name, _), n in self.unknown.counts.items():
            summary.unknown_fields[name] = summary.unknown_fields.get(name, 0) + n
        return summary
