"""The server's life: graceful stop on SIGTERM/SIGINT (in-flight requests finish, exit 0), a grace period that
runs out (the rest is aborted, exit 0), an engine that dies (errors, /health 503, nothing hangs), and a model
that cannot load (a clear error, exit status 1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import orjson
import pytest

from tests.server import running_server

pytestmark = pytest.mark.usefixtures("deadline")


def _stream(url: str, model: str, max_tokens: int, events: list, started: threading.Event) -> None:
    body = {"model": model, "prompt": "hello", "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
    except httpx.HTTPError as exc:
        events.append(f"client error: {exc}")
    started.set()


def _start_stream(server, max_tokens: int) -> tuple[threading.Thread, list]:
    events, started = [], threading.Event()
    thread = threading.Thread(target=_stream, args=(server.url, server.model, max_tokens, events, started))
    thread.start()
    assert started.wait(30)
    return thread, events


def _tokens(events: list) -> int:
    return sum(len(e["choices"][0]["text"]) > 0 for e in map(orjson.loads, events[:-1]) if e.get("choices"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_lets_in_flight_requests_finish_and_exits_0(tiny_llama_dir, sig):
    # A slow stream: a small budget of batched tokens and a long output keep it running after the signal.
    with running_server(tiny_llama_dir, "--max-model-len", "1024", "--graceful-shutdown-s", "60") as server:
        thread, events = _start_stream(server, 600)
        server.proc.send_signal(sig)
        thread.join(60)
        assert events[-1] == "[DONE]", events[-3:]
        last = orjson.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(server.url + "/health", timeout=2)


def test_stop_aborts_what_outlives_the_grace_period(tiny_llama_dir):
    with running_server(tiny_llama_dir, "--max-model-len", "1024", "--graceful-shutdown-s", "0.2",
                        "--max-num-batched-tokens", "64") as server:
        thread, events = _start_stream(server, 1000)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        thread.join(30)
        assert time.monotonic() - started < 15
        assert events[-1] == "[DONE]"  # aborted, and told so: an error event ends the stream, not a cut
        assert orjson.loads(events[-2])["error"]["code"] == "aborted"


def _core_pid(server_pid: int) -> int:
    out = subprocess.run(["pgrep", "-P", str(server_pid), "-f", "spawn_main"], capture_output=True, text=True)
    [pid] = out.stdout.split()
    return int(pid)


def test_engine_death_ends_requests_with_an_error_and_health_turns_503(tiny_llama_dir):
    # without restarts (test_engine_restart.py has them): the engine stays dead
    with running_server(tiny_llama_dir, "--max-model-len", "1024", "--no-engine-restart") as server:
        assert httpx.get(server.url + "/health").status_code == 200
        thread, events = _start_stream(server, 1000)
        os.kill(_core_pid(server.proc.pid), signal.SIGKILL)
        thread.join(30)
        assert not thread.is_alive()
        assert events[-1] == "[DONE]"
        error = orjson.loads(events[-2])["error"]
        assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health").status_code != 503:
            assert time.monotonic() < deadline, "/health still 200 after the engine died"
            time.sleep(0.1)
        body = {"model": server.model, "prompt": "hi", "max_tokens": 2}
        for stream in (False, True):
            response = httpx.post(server.url + "/v1/completions", json={**body, "stream": stream}, timeout=10)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "engine_unavailable"


def test_a_model_that_cannot_load_exits_1_with_the_reason(tmp_path):
    cmd = [sys.executable, "-m", "kvgate", "serve", "--port", "0",
           "--model", str(tmp_path / "missing")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "failed to start" in result.stderr and "missing" in result.stderr
