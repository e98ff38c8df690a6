"""Nothing invisible: a request that gets no answer (its client left, its body came too slowly, the engine died)
is counted in request_success_total with finished_reason="abort" and in request_errors_total by cause; a dead
engine's gauges read 0, a metric records the death and /health says why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import pytest

from tests.gateway.http_helpers import (
    COMPLETIONS,
    ENV_KEY,
    MAX_LEN,
    body_for,
    connect,
    metric,
    moved,
    read_response,
    request_bytes,
    scrape,
    wait_client_closed,
    wait_idle,
    wait_running,
)
from tests.server import running_server

pytestmark = pytest.mark.usefixtures("deadline")


def wait_counted(server, before: dict, cause: str, timeout: float = 5.0) -> dict:
    """Poll /metrics until one more abort for cause is counted; both counters moved by exactly one."""
    deadline = time.monotonic() + timeout
    while moved(before, after := scrape(server), "request_errors_total", cause=cause) < 1:
        assert time.monotonic() < deadline, f"no abort counted for {cause}"
        time.sleep(0.02)
    assert moved(before, after, "request_errors_total", cause=cause) == 1
    assert moved(before, after, "request_success_total", finished_reason="abort") == 1
    return after


def test_client_leaving_a_stream_is_counted(server):
    before = scrape(server)
    body = body_for(COMPLETIONS, server.model, max_tokens=MAX_LEN - 1, ignore_eos=True, stream=True)
    with httpx.Client(base_url=server.url, timeout=30) as c, c.stream("POST", COMPLETIONS, json=body) as r:
        assert r.status_code == 200
        next(r.iter_raw())
    wait_counted(server, before, "client_disconnect")
    wait_idle(server)


def test_client_leaving_before_the_answer_is_counted(server):
    before = scrape(server)
    body = json.dumps(body_for(COMPLETIONS, server.model, max_tokens=MAX_LEN - 1, ignore_eos=True)).encode()
    with connect(server) as sock:
        sock.sendall(request_bytes(COMPLETIONS, body))
        wait_running(server)
    wait_client_closed(server, before)
    wait_counted(server, before, "client_disconnect")
    wait_idle(server)


def test_body_timeout_is_counted(limited):
    before = scrape(limited)
    with connect(limited) as sock:
        sock.sendall(request_bytes(COMPLETIONS, b'{"model": ', {"Authorization": f"Bearer {ENV_KEY}"},
                                   content_length=100))
        assert read_response(sock)[0] == 408
    after = wait_counted(limited, before, "timeout")
    assert moved(before, after, "request_errors_total", cause="client_disconnect") == 0


def _kill_core(server) -> None:
    out = subprocess.run(["pgrep", "-P", str(server.proc.pid), "-f", "spawn_main"], capture_output=True, text=True,
                         check=True)
    os.kill(int(out.stdout.split()[0]), signal.SIGKILL)


def test_engine_death_is_counted_gauges_zero_and_health_says_why(tiny_llama_dir):
    with running_server(tiny_llama_dir, "--max-model-len", "1024", "--no-engine-restart") as server:
        assert metric(scrape(server), "engine_alive") == 1
        body = {"model": server.model, "prompt": "hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + COMPLETIONS, json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            wait_running(server)
            before = scrape(server)
            assert metric(before, "num_requests_running") == 1
            _kill_core(server)
            assert [line for line in lines if line][-1] == "data: [DONE]"
        after = wait_counted(server, before, "engine_dead")
        assert moved(before, after, "engine_deaths_total") == 1
        assert metric(after, "engine_alive") == 0
        for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
            assert metric(after, gauge) == 0, gauge
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        assert health.json()["error"].startswith("EngineDeadError: "), health.json()


def test_an_idle_engine_death_is_noticed(tiny_llama_dir):
    with running_server(tiny_llama_dir, "--no-engine-restart") as server:  # stays dead to be looked at
        _kill_core(server)
        deadline = time.monotonic() + 10
        while (health := httpx.get(server.url + "/health", timeout=10)).status_code != 503:
            assert time.monotonic() < deadline, "/health still 200 after the idle engine died"
            time.sleep(0.05)
        assert health.json()["error"].startswith("EngineDeadError: "), health.json()
        samples = scrape(server)
        assert metric(samples, "engine_deaths_total") == 1
        assert metric(samples, "engine_alive") == 0
