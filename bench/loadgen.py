"""The load generator for any OpenAI-compatible server: one load level, closed-loop (N users, each sending its
next request when its answer has come) or open-loop (requests sent on an arrival schedule, bench/arrivals.py,
whatever the server does), every request streamed and timed (bench/stream_client.py).

`run_load` is `kvgate bench load`'s closed-loop run with the figures it has always printed.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from bench.arrivals import schedule
from bench.levels import legacy_result
from bench.prompts import Lengths, synthetic
from bench.stream_client import Record, stream_one


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


@dataclass
class Target:
    """Where and how to send: the endpoint's URL, the headers and the body fields every request shares."""
    base: str
    chat: bool
    headers: dict
    timeout: aiohttp.ClientTimeout
    common: dict = field(default_factory=dict)
    keep_text: bool = False

    @property
    def url(self) -> str:
        return f"{self.base}/v1/chat/completions" if self.chat else f"{self.base}/v1/completions"

    def body(self, prompt) -> bytes:
        return orjson.dumps({**self.common, "max_tokens": prompt.max_tokens, **prompt.payload(self.chat)})


def make_target(url: str, endpoint: str, *, model: str | None, api_key: str | None, timeout_s: float,
                ignore_eos: bool = True, keep_text: bool = False) -> Target:
    if endpoint not in ("completions", "chat"):
        raise ValueError(f"endpoint must be 'completions' or 'chat', not {endpoint!r}")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    common = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    if ignore_eos:
        common["ignore_eos"] = True
    return Target(base_url(url), endpoint == "chat", headers, aiohttp.ClientTimeout(total=timeout_s), common,
                  keep_text)


async def first_model(session: aiohttp.ClientSession, target: Target) -> str:
    """The first model GET /v1/models lists."""
    async with session.get(f"{target.base}/v1/models", headers=target.headers, timeout=target.timeout) as resp:
        resp.raise_for_status()
        return orjson.loads(await resp.read())["data"][0]["id"]


async def server_info(session: aiohttp.ClientSession, target: Target) -> dict | None:
    """kvgate's GET /info body (max_batch_total_tokens, ...), or None when the server does not answer it."""
    try:
        async with session.get(f"{target.base}/info", headers=target.headers,
                               timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                return None
            info = orjson.loads(await resp.read())
            return info if isinstance(info, dict) else None
    except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError):
        return None


def session_for(limit: int) -> aiohttp.ClientSession:
    """limit: connections at most (0: unbounded, for open-loop levels)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False))


async def _send(session, target: Target, index: int, prompt, records: list, on_done) -> None:
    body = target.body(prompt)
    rec = await stream_one(session, target.url, body, target.chat, target.timeout, target.headers,
                           target.keep_text)
    rec.index, rec.prompt = index, prompt
    records.append(rec)
    if on_done is not None:
        on_done(rec)


async def run_closed(session, target: Target, prompts, *, concurrency: int, requests: int | None = None,
                     duration_s: float | None = None, on_done=None) -> list[Record]:
    """`concurrency` users, each sending its next request once its last answer has come: at most `concurrency`
    requests in flight. It stops after `requests` requests, or starts none after `duration_s` seconds."""
    records: list[Record] = []
    numbers = itertools.count()
    deadline = None if duration_s is None else time.perf_counter() + duration_s

    async def user() -> None:
        for index in numbers:
            if (requests is not None and index >= requests) or (deadline is not None
                                                                 and time.perf_counter() >= deadline):
                return
            await _send(session, target, index, next(prompts), records, on_done)

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return records


async def run_open(session, target: Target, prompts, *, rate: float, burstiness: float = 1.0, seed: int = 0,
                   requests: int | None = None, duration_s: float | None = None, on_done=None) -> list[Record]:
    """Requests sent at the times of `schedule(rate, burstiness, seed)`, however many are in flight."""
    times = schedule(rate, burstiness, seed, requests=requests, duration_s=duration_s)
    records: list[Record] = []
    tasks = []
    t0 = time.perf_counter()
    try:
        for index, at in enumerate(times):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_send(session, target, index, next(prompts), records, on_done)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return records


async def run_load(url: str, *, concurrency: int, num_requests: int, endpoint: str = "completions",
                   model: str | None = None, prompt: str | list[int] | None = None, prompt_tokens: int = 512,
                   max_tokens: int = 256, ignore_eos: bool = True, api_key: str | None = None,
                   timeout_s: float = 600.0, seed: int = 0) -> dict:
    """`kvgate bench load`'s closed-loop run: `num_requests` requests through `concurrency` users; latency and
    throughput in the keys it has always printed."""
    from bench.prompts import Prompt

    target = make_target(url, endpoint, model=model, api_key=api_key, timeout_s=timeout_s, ignore_eos=ignore_eos)
    if prompt is not None:
        prompts = itertools.repeat(Prompt(prompt=prompt, max_tokens=max_tokens))
    else:
        prompts = synthetic(endpoint, Lengths("fixed", prompt_tokens), Lengths("fixed", max_tokens), seed)
    async with session_for(concurrency) as session:
        if target.common["model"] is None:
            target.common["model"] = await first_model(session, target)
        records = await run_closed(session, target, prompts, concurrency=concurrency, requests=num_requests)
    return legacy_result(records, url=target.base, endpoint=endpoint, model=target.common["model"],
                         concurrency=concurrency, num_requests=num_requests)
