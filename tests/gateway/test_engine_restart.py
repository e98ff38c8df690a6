"""The engine comes back: a killed core is restarted (twice here) with /health 503 "restarting" meanwhile and 200
after; a stream in flight at the kill ends with today's error; a request sent during the restart waits and is
served, or, with a short --engine-wait-s, gets a 503 with Retry-After (holding its admission slot while it
waits: one more gets a 429); SIGTERM while restarting answers the waiting request and exits 0; the restart
limit leaves it dead with /health saying so; --no-engine-restart keeps it dead; no core process or descriptor
is left behind. Servers run side by side (each start is CPU-bound imports). Then the restart logic without
processes: the policy's arithmetic, and a Gateway over fake engines (a failing start retried, the limit)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import pytest

from engine.errors import EngineDeadError
from gateway.config import ServerConfig
from gateway.errors import APIError
from gateway.restart import RestartPolicy
from gateway.state import Gateway
from tests.gateway.http_helpers import COMPLETIONS, metric, scrape
from tests.server import running_server

pytestmark = pytest.mark.usefixtures("deadline")

SERVERS = {
    "restart": ["--engine-restart-backoff-s", "0.5", "--engine-wait-s", "60", "--graceful-shutdown-s", "1"],
    "short": ["--engine-restart-backoff-s", "8", "--engine-wait-s", "1", "--max-engine-restarts", "1",
              "--max-concurrent-requests", "1"],
    "off": ["--no-engine-restart"],
}


@pytest.fixture(scope="module")
def servers(tiny_llama_dir):
    contexts = {name: running_server(tiny_llama_dir, "--max-model-len", "1024", *args)
                for name, args in SERVERS.items()}
    with ThreadPoolExecutor(len(contexts)) as pool:
        starts = {name: pool.submit(cm.__enter__) for name, cm in contexts.items()}
        try:
            yield {name: start.result() for name, start in starts.items()}
        finally:
            for stop in [pool.submit(contexts[n].__exit__, None, None, None)
                         for n, s in starts.items() if s.exception() is None]:
                stop.result()


def _children(server) -> list[tuple[int, str, str]]:
    """(pid, state, command) of the server's child processes."""
    out = subprocess.run(["ps", "-ww", "--ppid", str(server.proc.pid), "-o", "pid=,stat=,args="], capture_output=True,
                         text=True)
    return [(int(p), s, a) for p, s, a in (line.split(None, 2) for line in out.stdout.splitlines())]


def _kill_core(server) -> None:
    [pid] = [p for p, _, args in _children(server) if "spawn_main" in args]
    os.kill(pid, signal.SIGKILL)


def _health(server) -> httpx.Response:
    return httpx.get(server.url + "/health", timeout=10)


def _wait_health(server, status: int, timeout: float = 60.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while (r := _health(server)).status_code != status:
        assert time.monotonic() < deadline, f"/health not {status}: {r.text}"
        time.sleep(0.05)
    return r


def _complete(server, timeout: float = 90.0, **changes) -> httpx.Response:
    body = {"model": server.model, "prompt": "hello", "max_tokens": 4, **changes}
    return httpx.post(server.url + COMPLETIONS, json=body, timeout=timeout)


def _assert_503(r: httpx.Response, retry_after: int | None = None) -> dict:
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["type"], error["code"]) == ("server_error", "engine_unavailable"), error
    assert int(r.headers["Retry-After"]) >= 1, r.headers
    if retry_after is not None:
        assert int(r.headers["Retry-After"]) == retry_after, r.headers
    return error


def _stream_events(server, events: list, started: threading.Event) -> None:
    body = {"model": server.model, "prompt": "hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + COMPLETIONS, json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()
    started.set()


def _fds(server) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def _wait_fds_at_most(server, most: int) -> None:
    deadline = time.monotonic() + 5  # a connection a client just closed may still be open here
    while (now := _fds(server)) > most:
        assert time.monotonic() < deadline, f"{now} descriptors open, {most} before"
        time.sleep(0.05)


def _restarted_once_more(server, restarts_before: int) -> None:
    """/health says restarting (and why) at once, a request sent now waits and is served, then /health is 200."""
    health = _wait_health(server, 503, timeout=10)
    body = health.json()
    assert body["status"] == "restarting", body
    assert body["error"].startswith("EngineDeadError: "), body
    assert int(health.headers["Retry-After"]) >= 1
    samples = scrape(server)  # the new engine is seconds away (a core's start): these are the restart's
    assert metric(samples, "engine_alive") == 0 and metric(samples, "num_requests_running") == 0
    assert httpx.get(server.base_url + "/models", timeout=10).status_code == 200  # still answered
    waited = _complete(server)
    assert waited.status_code == 200, waited.text
    assert waited.json()["choices"][0]["text"]
    assert _health(server).json() == {"status": "ok"}
    samples = scrape(server)
    assert metric(samples, "engine_restarts_total") == restarts_before + 1
    assert metric(samples, "engine_alive") == 1


def test_a_killed_core_is_restarted_twice(servers):
    server = servers["restart"]
    events, started = [], threading.Event()
    thread = threading.Thread(target=_stream_events, args=(server, events, started))
    thread.start()
    assert started.wait(30)
    fds = _fds(server)
    _kill_core(server)  # mid-stream: it ends as it does without restarts
    thread.join(30)
    assert not thread.is_alive() and events[-1] == "[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert (error["code"], error["type"]) == ("engine_unavailable", "server_error"), error
    _restarted_once_more(server, 0)

    _kill_core(server)  # idle, the second time
    _restarted_once_more(server, 1)
    samples = scrape(server)
    assert (metric(samples, "engine_deaths_total"), metric(samples, "engine_restarts_total")) == (2, 2)
    assert metric(samples, "request_errors_total", cause="engine_dead") == 1
    # nothing left of the dead cores: one child process running, no zombie, no descriptor more
    cores = [(pid, state) for pid, state, args in _children(server) if "spawn_main" in args or "Z" in state]
    assert len(cores) == 1 and "Z" not in cores[0][1], _children(server)
    _wait_fds_at_most(server, fds)


def test_a_short_wait_gets_503_with_retry_after_and_the_limit_leaves_it_dead(servers):
    server = servers["short"]
    _kill_core(server)
    health = _wait_health(server, 503, timeout=10)
    assert health.json()["status"] == "restarting"
    answers = []

    def timed() -> None:
        started = time.monotonic()
        answers.append((_complete(server), time.monotonic() - started))

    threads = [threading.Thread(target=timed) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)
    for thread in threads:
        thread.join(30)
    # one waits 1 s (the restart is 8 s away) and gets a 503; the other finds the one slot taken: 429
    (refused, _), (waited, seconds) = sorted(answers, key=lambda a: a[0].status_code)
    assert refused.status_code == 429, refused.text
    error = _assert_503(waited)
    assert "restarting" in error["message"] and 0.9 < seconds < 4
    assert _complete(server, stream=True).status_code == 503
    assert _wait_health(server, 200).json() == {"status": "ok"}
    assert _complete(server).status_code == 200

    _kill_core(server)  # the one restart allowed in the window is spent
    health = _wait_health(server, 503, timeout=10)
    time.sleep(0.5)
    body = _health(server).json()
    assert body["status"] == "unavailable", body
    assert body["error"].startswith("EngineDeadError: ") and "restart limit was reached" in body["error"], body
    error = _assert_503(_complete(server), retry_after=1)
    assert "restart limit" in error["message"]
    assert httpx.get(server.base_url + "/models", timeout=10).status_code == 200
    samples = scrape(server)
    assert (metric(samples, "engine_deaths_total"), metric(samples, "engine_restarts_total")) == (2, 1)
    assert metric(samples, "engine_alive") == 0


def test_without_restarts_a_dead_engine_stays_dead(servers):
    server = servers["off"]
    _kill_core(server)
    _wait_health(server, 503, timeout=10)
    time.sleep(1.5)  # past the first backoff a restart would take
    body = _health(server).json()
    assert body["status"] == "unavailable" and body["error"].startswith("EngineDeadError: "), body
    _assert_503(_complete(server, timeout=10), retry_after=1)
    assert not [p for p, _, args in _children(server) if "spawn_main" in args]
    samples = scrape(server)
    assert (metric(samples, "engine_deaths_total"), metric(samples, "engine_restarts_total")) == (1, 0)


def test_sigterm_while_restarting_answers_the_waiting_request_and_exits(servers):
    server = servers["restart"]  # the last test of it: this one stops it
    _kill_core(server)
    _wait_health(server, 503, timeout=10)
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(_complete(server, timeout=60)))
    waiting.start()
    time.sleep(0.2)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    waiting.join(30)
    assert time.monotonic() - started < 1 + 5  # --graceful-shutdown-s 1, and a moment to exit
    error = _assert_503(answers[0])  # at once: no restart during the drain
    assert "shutting down" in error["message"]


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_backoff_doubles_to_its_cap_and_the_limit_counts_attempts_in_the_window():
    clock = _Clock()
    policy = RestartPolicy(limit=4, window_s=600, backoff_s=1, max_backoff_s=3, clock=clock)
    delays = []
    while (delay := policy.next_delay()) is not None:
        delays.append(delay)
        policy.attempted()
        clock.now += delay + 10
    assert delays == [1, 2, 3, 3]  # doubling, capped; then the limit: 4 attempts within 600 s
    assert "4 restarts within 600 s" in policy.describe_limit()
    clock.now = 1000 + 600  # the first attempt has left the window: one more is allowed
    assert policy.next_delay() == 3
    clock.now += 10_000  # a long healthy run: the window is empty, the backoff starts over
    assert policy.next_delay() == 1


def test_a_limit_of_one():
    clock = _Clock()
    policy = RestartPolicy(limit=1, window_s=60, backoff_s=0.5, max_backoff_s=30, clock=clock)
    assert policy.next_delay() == 0.5
    policy.attempted()
    clock.now += 59.9
    assert policy.next_delay() is None
    assert policy.describe_limit() == "the restart limit was reached (1 restart within 60 s)"
    clock.now += 0.1
    assert policy.next_delay() == 0.5


class _FakeEngine:
    """What Gateway asks of an AsyncLLM, without a core: it dies when told."""

    def __init__(self) -> None:
        self.on_dead, self.dead_error, self.stopped = None, None, False
        self.last_stats = None

    @property
    def is_running(self) -> bool:
        return self.dead_error is None and not self.stopped

    def watch(self) -> None:
        pass

    def die(self) -> None:
        self.dead_error = EngineDeadError("engine core process died (exit code -9)")
        self.on_dead(self.dead_error)

    def shutdown(self) -> None:
        self.stopped = True


def _gateway(monkeypatch, outcomes: list, **config) -> tuple[Gateway, list[_FakeEngine]]:
    """A Gateway whose factory gives a fake engine, or raises, per outcome (True: an engine)."""
    monkeypatch.setattr("gateway.state.Service", lambda engine, *args, **kwargs: ("service", engine))
    built = []

    def factory():
        if not outcomes.pop(0):
            raise RuntimeError("CUDA out of memory")
        built.append(_FakeEngine())
        return built[-1]

    config = ServerConfig(**{"engine_restart_backoff_s": 0.01, "engine_restart_max_backoff_s": 0.04, **config})
    return Gateway(config, factory), built


def test_a_failed_restart_is_retried_with_backoff_until_one_comes_up(monkeypatch):
    gateway, built = _gateway(monkeypatch, [True, False, False, True], max_engine_restarts=3)

    async def body():
        await gateway.start()
        built[0].die()
        assert gateway.restarting and not gateway.ready
        with pytest.raises(APIError) as refused:
            gateway.require_service()  # the routes that do not wait
        assert refused.value.status == 503 and "restarting" in refused.value.message
        service = await asyncio.wait_for(gateway.wait_for_service(), 5)
        assert service == ("service", built[1]) and gateway.ready
        assert built[0].stopped  # the dead one was shut down
        assert gateway.restart_error is None and gateway.metrics.engine_restarts._value.get() == 1

    asyncio.run(body())


def test_failed_restarts_stop_at_the_limit(monkeypatch):
    gateway, built = _gateway(monkeypatch, [True, False, False], max_engine_restarts=2)

    async def body():
        await gateway.start()
        built[0].die()
        with pytest.raises(APIError) as refused:
            await asyncio.wait_for(gateway.wait_for_service(), 5)
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
        assert not gateway.restarting
        assert gateway.error.startswith("EngineDeadError: ") and "restart limit was reached" in gateway.error
        assert gateway.error.endswith("; the last restart failed: RuntimeError: CUDA out of memory")
        assert gateway.metrics.engine_restarts._value.get() == 0

    asyncio.run(body())


def test_a_new_request_does_not_wait_when_engine_wait_s_is_0(monkeypatch):
    gateway, built = _gateway(monkeypatch, [True, True], engine_wait_s=0, engine_restart_backoff_s=5,
                              engine_restart_max_backoff_s=5)

    async def body():
        await gateway.start()
        built[0].die()
        with pytest.raises(APIError) as refused:
            await asyncio.wait_for(gateway.wait_for_service(), 1)
        assert refused.value.headers == {"Retry-After": "5"}  # seconds until the attempt
        gateway.stop()  # cancels the restart: no engine is built
        await asyncio.sleep(0)
        assert len(built) == 1 and not gateway.restarting

    asyncio.run(body())
