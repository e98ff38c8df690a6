"""One streamed request to an OpenAI-compatible server, timed chunk by chunk, and what went wrong if it failed.

The load generator shares the CPU with the server under test, so the per-chunk path is kept short: bytes are
read as they come (`iter_any`), split into lines, each `data:` line parsed once with orjson, and one timestamp
taken per read (chunks that arrive together share it). Failures are grouped by kind: `http_<status>`,
`timeout`, `connection_refused`, `connection_error`, `stream_cut_short` (the body ended before `data: [DONE]`),
`stream_error` (an error event in the stream), `bad_json`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import orjson


@dataclass(slots=True)
class Record:
    index: int = 0  # the request's number in its level (warm-up requests first)
    start: float = 0.0
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk carrying content
    texts: list[str] | None = None  # the content pieces, kept only when tokens must be counted locally
    usage_prompt: int | None = None  # the server's usage, when it sends one
    usage_output: int | None = None
    error_kind: str | None = None
    error: str | None = None
    prompt: object = None  # the bench.prompts.Prompt sent
    aborted: bool = False  # the client left on purpose after `stop_after` chunks (not an error)

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None


def error_message(status: int, body: bytes) -> str:
    try:
        err = orjson.loads(body).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
    except (orjson.JSONDecodeError, AttributeError):
        msg = None
    return f"HTTP {status}: {msg or body[:200].decode(errors='replace')}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def stream_one(session: aiohttp.ClientSession, url: str, body: bytes, chat: bool,
                     timeout: aiohttp.ClientTimeout, headers: dict, keep_text: bool = False,
                     stop_after: int | None = None) -> Record:
    """stop_after: close the connection mid-stream once this many chunks have come, as a client that goes away
    does (the record says `aborted`)."""
    now, loads = time.perf_counter, orjson.loads
    rec = Record(start=now())
    chunks = rec.chunk_times
    texts = rec.texts = [] if keep_text else None
    key = "delta" if chat else None
    started = done = False
    steps = 0  # chunks with choices, empty text included (a token may decode to no text yet)
    try:
        async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                rec.error_kind, rec.error = f"http_{resp.status}", error_message(resp.status, await resp.read())
                return rec
            started, buf = True, b""
            async for data in resp.content.iter_any():
                t = now()
                if b"\n" not in data:
                    buf += data
                    continue
                lines = (buf + data).split(b"\n")
                buf = lines.pop()
                for line in lines:
                    if line[:5] != b"data:":
                        continue  # blank separators, comments, event: lines
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    chunk = loads(payload)
                    choices = chunk.get("choices")
                    if choices:
                        steps += 1
                        if stop_after is not None and steps >= stop_after:
                            rec.aborted = True
                            return rec  # leaving the `async with` unread closes the connection
                        choice = choices[0]
                        piece = (choice.get(key) or {}).get("content") if key else choice.get("text")
                        if piece:
                            chunks.append(t)
                            if texts is not None:
                                texts.append(piece)
                    elif chunk.get("error"):
                        err = chunk["error"]
                        rec.error_kind = "stream_error"
                        rec.error = str(err.get("message", err) if isinstance(err, dict) else err)
                        return rec
                    usage = chunk.get("usage")
                    if usage:
                        rec.usage_output = usage.get("completion_tokens")
                        rec.usage_prompt = usage.get("prompt_tokens")
                if done:
                    break
        if not done:
            rec.error_kind, rec.error = "stream_cut_short", "the stream ended without data: [DONE]"
    except asyncio.TimeoutError as exc:  # aiohttp's ServerTimeoutError is one too
        rec.error_kind, rec.error = "timeout", _describe(exc) if str(exc) else "the request timed out"
    except aiohttp.ClientConnectorError as exc:
        refused = isinstance(exc.os_error, ConnectionRefusedError)
        rec.error_kind, rec.error = ("connection_refused" if refused else "connection_error"), _describe(exc)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        rec.error_kind, rec.error = ("stream_cut_short" if started else "connection_error"), _describe(exc)
    except aiohttp.ClientError as exc:
        rec.error_kind, rec.error = "connection_error", _describe(exc)
    except orjson.JSONDecodeError as exc:
        rec.error_kind, rec.error = "bad_json", _describe(exc)
    except Exception as exc:  # any failure of one request is recorded, the run goes on
        rec.error_kind, rec.error = type(exc).__name__, _describe(exc)
    finally:
        rec.end = now()
    return rec
