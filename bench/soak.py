"""`kvgate bench soak`: `kvgate serve` kept saturated for a long while, to show that nothing grows without bound
and nothing is left behind.

The server runs in a process of its own with the given engine settings. N streaming clients each send their next
request as soon as the last one ended; prompt and output lengths are drawn per request, and a fraction of the
requests is abandoned mid-stream after a random number of tokens (the client closes the connection). Every
`sample_every_s` seconds one sample: the server's metrics (requests running and waiting, KV-cache usage, 5xx so
far), the resident memory of the server's process tree (gateway and engine core) and the device memory in use.
When the time is up the clients start nothing new, the last answers come in, and the soak waits for the engine to
be idle: KV usage back at 0, or a block was leaked. Memory is judged on the samples after `warmup_s`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import aiohttp

from bench.gateway_speed import _wait_healthy
from bench.levels import error_examples, level_figures
from bench.loadgen import first_model, make_target, session_for
from bench.process_memory import device_memory_used_bytes, tree_rss_bytes
from bench.prompts import Lengths, synthetic
from bench.stream_client import Record, stream_one
from engine.config import EngineConfig

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as `kvgate serve` logs
IDLE_TIMEOUT_S = 120.0  # after the load: the engine must be idle (nothing running, no KV block held) within this


@dataclass
class SoakSettings:
    clients: int = 256
    duration_s: float = 600.0
    abort_fraction: float = 0.1  # of the requests, left mid-stream
    prompt_tokens: Lengths = field(default_factory=lambda: Lengths("uniform", 64, 1024))
    max_tokens: Lengths = field(default_factory=lambda: Lengths("uniform", 16, 512))
    sample_every_s: float = 10.0
    warmup_s: float = 60.0
    seed: int = 0
    port: int = 8125
    timeout_s: float = 600.0  # per request

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if not 0.0 <= self.abort_fraction <= 1.0:
            raise ValueError(f"abort_fraction must be in [0, 1], got {self.abort_fraction}")
        for name in ("duration_s", "sample_every_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.warmup_s < 0:
            raise ValueError(f"warmup_s must be >= 0, got {self.warmup_s}")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "prompt_tokens": str(self.prompt_tokens),
                "max_tokens": str(self.max_tokens)}


def scrape(text: str) -> dict:
    """The few server figures a sample keeps, from a /metrics body (summed over labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"kvgate:num_requests_running": "running", "kvgate:num_requests_waiting": "waiting",
              "kvgate:kv_cache_usage_perc": "kv_cache_usage"}
    figures = dict.fromkeys(wanted.values(), 0.0) | {"http_5xx": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                figures[wanted[s.name]] += s.value
            elif s.name == "kvgate:http_responses_total" and s.labels.get("status", "").startswith("5"):
                figures["http_5xx"] += s.value
    return figures


async def _server_figures(session: aiohttp.ClientSession, base: str) -> dict:
    async with session.get(f"{base}/metrics", timeout=aiohttp.ClientTimeout(total=30)) as resp:
        resp.raise_for_status()
        return scrape(await resp.text())


async def _sample(session, base: str, pid: int, t0: float, records: list[Record], phase: str) -> dict:
    figures = await _server_figures(session, base)
    device = await asyncio.to_thread(device_memory_used_bytes)
    return {"t_s": round(time.perf_counter() - t0, 2), "phase": phase, **figures,
            "server_rss_bytes": tree_rss_bytes(pid), "device_memory_bytes": device,
            "requests_done": len(records), "output_tokens": sum(_output_tokens(r) for r in records)}


def _output_tokens(rec: Record) -> int:
    return rec.usage_output if rec.usage_output is not None else len(rec.chunk_times)


async def _client(session, target, prompts, rng: random.Random, s: SoakSettings, deadline: float,
                  records: list[Record]) -> None:
    while time.perf_counter() < deadline:
        prompt = next(prompts)
        leave = rng.random() < s.abort_fraction
        stop_after = rng.randint(1, max(1, prompt.max_tokens - 1)) if leave else None
        rec = await stream_one(session, target.url, target.body(prompt), target.chat, target.timeout,
                               target.headers, stop_after=stop_after)
        rec.prompt = prompt
        records.append(rec)


async def _wait_idle(session, base: str) -> float:
    """Seconds until nothing runs, nothing waits and no KV block is held (or IDLE_TIMEOUT_S)."""
    start = time.perf_counter()
    while time.perf_counter() - start < IDLE_TIMEOUT_S:
        f = await _server_figures(session, base)
        if f["running"] == 0 and f["waiting"] == 0 and f["kv_cache_usage"] == 0:
            break
        await asyncio.sleep(0.5)
    return round(time.perf_counter() - start, 2)


async def soak(url: str, pid: int, s: SoakSettings, on_sample=None) -> dict:
    """The load and the samples against the server at `url`, whose process (and its children) is `pid`."""
    target = make_target(url, "completions", model=None, api_key=None, timeout_s=s.timeout_s)
    prompts = synthetic("completions", s.prompt_tokens, s.max_tokens, s.seed)
    records: list[Record] = []
    samples: list[dict] = []
    async with session_for(s.clients + 4) as session:  # a few spare connections for the sampler
        target.common["model"] = await first_model(session, target)
        t0 = time.perf_counter()
        deadline = t0 + s.duration_s
        clients = asyncio.gather(*(_client(session, target, prompts, random.Random(f"soak-{s.seed}-{i}"), s,
                                           deadline, records) for i in range(s.clients)))
        while not clients.done():
            samples.append(await _sample(session, target.base, pid, t0, records, "load"))
            if on_sample is not None:
                on_sample(samples[-1])
            await asyncio.wait([clients], timeout=s.sample_every_s)
        await clients
        loaded_s = time.perf_counter() - t0
        idle_after_s = await _wait_idle(session, target.base)
        samples.append(await _sample(session, target.base, pid, t0, records, "end"))
        if on_sample is not None:
            on_sample(samples[-1])
    return {"model": target.common["model"], "loaded_s": round(loaded_s, 2), "idle_after_s": idle_after_s,
            "summary": summarize(records, samples, s, loaded_s), "samples": samples}


def _spread(samples: list[dict], key: str) -> dict | None:
    values = [x[key] for x in samples if x[key] is not None]
    if not values:
        return None
    return {"first": values[0], "last": values[-1], "min": min(values), "max": max(values),
            "growth": values[-1] - values[0]}


def summarize(records: list[Record], samples: list[dict], s: SoakSettings, loaded_s: float) -> dict:
    whole = [r for r in records if not r.aborted]
    figures, _ = level_figures(whole, mode="closed", concurrency=s.clients, rate=None, burstiness=None,
                               slo_ttft_s=2.0, slo_tpot_s=0.05)
    settled = [x for x in samples if x["phase"] == "load" and x["t_s"] >= s.warmup_s] or samples[-1:]
    end = samples[-1]
    return {
        "requests": len(records), "completed": figures["completed"],
        "aborted_by_client": sum(r.aborted for r in records),
        "errors": figures["errors"], "error_examples": error_examples(whole),
        "output_tokens_per_s": round(sum(_output_tokens(r) for r in records) / loaded_s, 1),
        "ttft_s": figures["ttft_s"], "tpot_s": figures["tpot_s"],
        "server_rss_after_warmup": _spread(settled, "server_rss_bytes"),
        "device_memory_after_warmup": _spread(settled, "device_memory_bytes"),
        "peak_kv_cache_usage": max(x["kv_cache_usage"] for x in samples),
        "kv_cache_usage_at_end": end["kv_cache_usage"], "running_at_end": end["running"],
        "waiting_at_end": end["waiting"],
        "http_5xx": end["http_5xx"] - samples[0]["http_5xx"],  # not the 503s /health gave while the model loaded
    }


def run(config: EngineConfig, s: SoakSettings, on_sample=None) -> dict:
    """Start `kvgate serve` on `config`, soak it, stop it; the samples and the summary, plus the number of
    ERROR lines and tracebacks the server logged."""
    fields = json.dumps(dataclasses.asdict(config))
    code = (f"import logging; logging.basicConfig(level='WARNING', format={LOG_FORMAT!r}); "
            f"from bench.serve_speed import serve_engine; serve_engine({s.port}, {fields!r}, {2 * s.clients})")
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the server
    server = subprocess.Popen([sys.executable, "-c", code], stderr=log, stdout=log, text=True)
    url = f"http://127.0.0.1:{s.port}"
    try:
        try:
            _wait_healthy(url, server, timeout_s=900)
        except RuntimeError as exc:
            log.seek(0)
            raise RuntimeError(f"{exc}; its log ends: {log.read()[-2000:]}") from exc
        doc = asyncio.run(soak(url, server.pid, s, on_sample))
    finally:
        server.terminate()
        server.wait(120)
    log.seek(0)
    lines = log.read().splitlines()
    log.close()
    bad = [line for line in lines if " ERROR " in line or line.startswith("Traceback")]
    doc["summary"]["server_errors_logged"] = len(bad)
    doc["server_error_lines"] = bad[:20]
    return doc
