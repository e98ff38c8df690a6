"""A bounded soak on the CPU: 64 clients for about 25 s against `kvgate serve` on the embedded default model, with
streams aborted mid-way, malformed bodies, structured output and plain requests mixed in. Afterwards the engine
holds no KV block and runs nothing (a leaked block would keep kv_cache_usage above 0), no response was a 5xx,
every refusal was a 400 naming its field, and the server logged no error."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from tests.gateway.conftest import assert_no_server_errors
from tests.gateway.http_helpers import CHAT, COMPLETIONS, metric, scrape, wait_idle
from tests.server import running_server

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deadline")]

CLIENTS, SECONDS = 64, 25.0  # the server's start and the last requests' tail fit the 120 s deadline too
MALFORMED = [  # (body, the param the 400 must name)
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
     "response_format"),
]


async def _client(http: httpx.AsyncClient, model: str, seed: int, until: float, seen: dict) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        kind = rng.choice(["stream", "abort", "whole", "json", "bad"])
        messages = [{"role": "user", "content": f"Count to {rng.randint(3, 30)}."}]
        if kind == "bad":
            body, param = rng.choice(MALFORMED)
            r = await http.post(CHAT, json={"model": model, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        elif kind in ("stream", "abort"):
            body = {"model": model, "messages": messages, "max_tokens": rng.randint(4, 24), "stream": True}
            async with http.stream("POST", CHAT, json=body) as r:
                assert r.status_code == 200, await r.aread()
                chunks = 0
                async for line in r.aiter_lines():
                    chunks += line.startswith("data: ")
                    if kind == "abort" and chunks == 2:
                        break  # leaving the block closes the connection mid-stream
        elif kind == "json":
            body = {"model": model, "prompt": "A JSON object:", "max_tokens": 16,
                    "response_format": {"type": "json_object"}}
            r = await http.post(COMPLETIONS, json=body)
            assert r.status_code == 200, r.text
        else:
            r = await http.post(CHAT, json={"model": model, "messages": messages, "max_tokens": rng.randint(1, 24)})
            assert r.status_code == 200, r.text
        seen[kind] = seen.get(kind, 0) + 1


async def _soak(url: str, model: str) -> dict:
    seen: dict = {}
    until = time.monotonic() + SECONDS
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(_client(http, model, i, until, seen) for i in range(CLIENTS)))
    return seen


def test_soak_leaves_nothing_behind():
    with running_server(None) as server:
        model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        started = time.monotonic()
        seen = asyncio.run(_soak(server.url, model))
        print(f"soak: {seen} in {time.monotonic() - started:.1f} s")
        assert all(seen.get(k, 0) >= 5 for k in ("stream", "abort", "whole", "json", "bad")), seen
        samples = wait_idle(server, timeout=30.0)  # every block back: nothing leaked
        fives = sum(v for k, v in samples.items() if k.startswith("kvgate:http_responses_total{")
                    and 'status="5' in k)
        assert fives == 0
        assert metric(samples, "http_responses_total", status="400") >= seen["bad"]
        assert scrape(server)  # still serving
        assert_no_server_errors({"soak": server})
