"""Closed-loop load generator for any OpenAI-compatible server: `concurrency` workers stream `num_requests`
completions (or chat completions) and report TTFT, TPOT, ITL, end-to-end latency and throughput.

It shares the CPU with the server under test, so per-chunk work is kept to one orjson parse and a timestamp;
request bodies are serialized before the clock starts.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

_WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "red", "big", "house", "river", "old")


@dataclass(slots=True)
class _Result:
    start: float = 0.0
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk carrying content
    output_tokens: int = 0
    error: str | None = None


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _prompts(endpoint: str, prompt: str | list[int] | None, prompt_tokens: int, n: int, seed: int = 0) -> list:
    """One prompt per request. Generated prompts differ per request (one seeded stream), so a server's prefix
    cache cannot turn every prefill after the first into a hit; a warm-up round with another seed leaves the
    measured round's prompts uncached."""
    if prompt is not None:
        return [prompt] * n
    rng = random.Random(seed)
    if endpoint == "chat":
        return [" ".join(rng.choices(_WORDS, k=prompt_tokens)) for _ in range(n)]
    return [rng.choices(range(1000, 5000), k=prompt_tokens) for _ in range(n)]


def _percentiles(xs: list[float]) -> dict:
    """p50/p90/p99 by linear interpolation between closest ranks (numpy's default), and the mean."""
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    xs = sorted(xs)

    def q(p: float) -> float:
        pos = (len(xs) - 1) * p
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": sum(xs) / len(xs)}


def _error_message(status: int, body: bytes) -> str:
    try:
        err = orjson.loads(body).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
    except (orjson.JSONDecodeError, AttributeError):
        msg = None
    return f"HTTP {status}: {msg or body[:200].decode(errors='replace')}"


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, chat: bool, timeout: aiohttp.ClientTimeout,
               headers: dict) -> _Result:
    res = _Result(start=time.perf_counter())
    chunks, usage_tokens, done = res.chunk_times, None, False
    try:
        async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                res.error = _error_message(resp.status, await resp.read())
                return res
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event: lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = orjson.loads(data)
                if chunk.get("error"):
                    err = chunk["error"]
                    res.error = str(err.get("message", err) if isinstance(err, dict) else err)
                    return res
                for choice in chunk.get("choices") or ():
                    if (choice.get("delta") or {}).get("content") if chat else choice.get("text"):
                        chunks.append(time.perf_counter())
                        break
                usage = chunk.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
        if not done:
            res.error = "stream ended without data: [DONE]"
        # a server may pack several tokens per chunk: usage is the true count, chunks only a fallback
        res.output_tokens = usage_tokens if usage_tokens is not None else len(chunks)
    except Exception as e:  # any failure of one request is recorded, the run goes on
        res.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    finally:
        res.end = time.perf_counter()
    return res


async def run_load(url: str, *, concurrency: int, num_requests: int, endpoint: str = "completions",
                   model: str | None = None, prompt: str | list[int] | None = None, prompt_tokens: int = 512,
                   max_tokens: int = 256, ignore_eos: bool = True, api_key: str | None = None,
                   timeout_s: float = 600.0, seed: int = 0) -> dict:
    if endpoint not in ("completions", "chat"):
        raise ValueError(f"endpoint must be 'completions' or 'chat', not {endpoint!r}")
    base = _base(url)
    chat = endpoint == "chat"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        if model is None:
            async with session.get(f"{base}/v1/models", headers=headers, timeout=timeout) as resp:
                resp.raise_for_status()
                model = orjson.loads(await resp.read())["data"][0]["id"]

        common = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                  "max_tokens": max_tokens, "temperature": 0}
        if ignore_eos:
            common["ignore_eos"] = True
        bodies = []
        for p in _prompts(endpoint, prompt, prompt_tokens, num_requests, seed):
            payload = {"messages": [{"role": "user", "content": p}]} if chat else {"prompt": p}
            bodies.append(orjson.dumps({**common, **payload}))
        target = f"{base}/v1/chat/completions" if chat else f"{base}/v1/completions"

        results: list[_Result] = []
        todo = iter(bodies)  # shared by the workers: each takes the next body until none is left

        async def worker() -> None:
            for body in todo:
                results.append(await _one(session, target, body, chat, timeout, headers))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = (max(r.end for r in results) if results else time.perf_counter()) - start

    ok = [r for r in results if r.error is None]
    errors: list[str] = []
    for r in results:
        if r.error is not None and r.error not in errors and len(errors) < 5:
            errors.append(r.error)
    ttft = [r.chunk_times[0] - r.start for r in ok if r.chunk_times]
    tpot = [(r.chunk_times[-1] - r.chunk_times[0]) / (r.output_tokens - 1)
            for r in ok if r.chunk_times and r.output_tokens > 1]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "url": base, "endpoint": endpoint, "model": model, "concurrency": concurrency,
        "num_requests": num_requests, "completed": len(ok), "failed": len(results) - len(ok), "errors": errors,
        "duration_s": duration,
        "output_tokens": output_tokens,
        "content_chunks": sum(len(r.chunk_times) for r in ok),  # fewer than tokens when the server packs them
        "output_tokens_per_s": output_tokens / duration if duration > 0 else 0.0,
        "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
        "ttft_s": _percentiles(ttft), "tpot_s": _percentiles(tpot), "itl_s": _percentiles(itl),
        "e2e_s": _percentiles([r.end - r.start for r in ok]),
    }
