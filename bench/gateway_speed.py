"""How fast the gateway streams when the engine is not the limit: `kvgate serve` with FakeEngineCore (tokens at
once) in one process, the load generator in another, on loopback. The result is the gateway's ceiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

from bench.fake_core import FakeEngineCore
from engine.config import EngineConfig
from gateway.config import ServerConfig


def serve_fake(port: int, model: str | None, max_num_seqs: int) -> None:
    """The server process: the real gateway and front end over the fake core."""
    from engine.llm import AsyncLLM
    from gateway.server import serve

    engine = EngineConfig(model=model, max_num_seqs=max_num_seqs)
    config = ServerConfig(engine=engine, port=port, max_concurrent_requests=max(1024, 4 * max_num_seqs))
    serve(config, engine_factory=lambda: AsyncLLM(config=engine, core_class=FakeEngineCore))


def run(concurrency: int, num_requests: int, max_tokens: int, prompt_tokens: int, port: int,
        model: str | None, step_ms: float = 0.0) -> dict:
    code = f"from bench.gateway_speed import serve_fake; serve_fake({port}, {model!r}, {concurrency})"
    env = {**os.environ, "KVGATE_FAKE_STEP_S": str(step_ms / 1000)}
    server = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, server)
        load = [sys.executable, "-m", "kvgate", "bench", "load", "--url", url,
                "--concurrency", str(concurrency), "--requests", str(num_requests), "--max-tokens", str(max_tokens),
                "--prompt-tokens", str(prompt_tokens)]
        out = subprocess.run(load, capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(60)
    result["engine"] = f"FakeEngineCore, a step every {step_ms} ms" if step_ms else "FakeEngineCore, tokens at once"
    return result


def _wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read() if server.stderr else ''}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy")
