"""bench/loadgen.py and `kvgate bench load` (bench/sweep_command.py) against a fake OpenAI-compatible SSE server
(aiohttp.web, in a thread of its own so that both asyncio.run in the test and the CLI's own event loop can reach it)."""

from __future__ import annotations

import asyncio
import threading

import orjson
import pytest
from aiohttp import web
from click.testing import CliRunner

from bench.loadgen import run_load
from bench.sweep_command import load

PIECES = ["a", "bc", "d", "ef"]  # 4 content chunks, some packing 2 tokens as a server behind its client does
N_TOKENS = 6


class FakeServer:
    """Streams PIECES; model "flaky" answers every 4th request with a 429, model "nousage" sends no usage."""

    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.last_body: dict = {}
        self.last_auth: str | None = None
        self.port = 0

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list",
                                  "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "x"}]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        body = await request.json()
        self.requests += 1
        self.last_body = body
        self.last_auth = request.headers.get("Authorization")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if body["model"] == "flaky" and self.requests % 4 == 0:
                return web.json_response({"error": {"message": "too many requests", "type": "rate_limit",
                                                    "param": None, "code": 429}}, status=429)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            base = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
                    "model": body["model"]}
            for piece in PIECES:
                await asyncio.sleep(0.002)
                choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                          else {"index": 0, "text": piece, "finish_reason": None, "logprobs": None})
                await resp.write(b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n")
            if body["model"] != "nousage":
                usage = {"prompt_tokens": 3, "completion_tokens": N_TOKENS, "total_tokens": 3 + N_TOKENS}
                await resp.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        finally:
            self.in_flight -= 1


@pytest.fixture
def server():
    fake = FakeServer()
    app = web.Application()
    app.router.add_get("/v1/models", fake.models)
    app.router.add_post("/v1/completions", fake.complete)
    app.router.add_post("/v1/chat/completions", fake.complete)
    runner = web.AppRunner(app)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        fake.port = runner.addresses[0][1]
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(5)
    yield fake
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _check_ok(result: dict, n: int) -> None:
    assert result["completed"] == n and result["failed"] == 0 and result["errors"] == []
    assert result["output_tokens"] == N_TOKENS * n
    assert result["output_tokens_per_s"] > 0 and result["requests_per_s"] > 0 and result["duration_s"] > 0
    for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert all(v is not None and v >= 0 for v in result[metric].values()), metric


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_closed_loop_load(server, endpoint):
    result = asyncio.run(run_load(f"http://127.0.0.1:{server.port}/v1/", concurrency=4, num_requests=20,
                                  endpoint=endpoint, prompt_tokens=16, max_tokens=N_TOKENS, timeout_s=10))
    _check_ok(result, 20)
    assert result["model"] == "fake" and result["url"] == f"http://127.0.0.1:{server.port}"
    assert server.requests == 20 and 2 <= server.max_in_flight <= 4
    body = server.last_body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0 and body["max_tokens"] == N_TOKENS
    if endpoint == "chat":
        assert len(body["messages"][0]["content"].split()) == 16
    else:
        assert len(body["prompt"]) == 16 and all(1000 <= t < 5000 for t in body["prompt"])


def test_failures_are_counted(server):
    result = asyncio.run(run_load(f"http://127.0.0.1:{server.port}", concurrency=3, num_requests=12, model="flaky",
                                  ignore_eos=False, timeout_s=10))
    assert result["completed"] == 9 and result["failed"] == 3
    assert result["errors"] == ["HTTP 429: too many requests"]
    assert result["output_tokens"] == N_TOKENS * 9
    assert server.requests == 12 and server.max_in_flight <= 3 and "ignore_eos" not in server.last_body


def test_tokens_fall_back_to_chunks_without_usage(server):
    result = asyncio.run(run_load(f"http://127.0.0.1:{server.port}", concurrency=2, num_requests=4, model="nousage",
                                  prompt="hello", timeout_s=10))
    assert result["completed"] == 4 and result["output_tokens"] == len(PIECES) * 4
    assert server.last_body["prompt"] == "hello"


def test_unreachable_server_is_a_failure_not_a_crash(server):
    port = server.port
    result = asyncio.run(run_load(f"http://127.0.0.1:{port}/nowhere", concurrency=2, num_requests=2, model="fake",
                                  timeout_s=5))
    assert result["completed"] == 0 and result["failed"] == 2 and result["errors"][0].startswith("HTTP 404")
    assert result["ttft_s"]["n"] == 0 and result["ttft_s"]["p50"] is None and result["ttft_s"]["mean"] is None


def test_cli_prints_one_json_line(server):
    result = CliRunner().invoke(load, ["--url", f"http://127.0.0.1:{server.port}", "--concurrency", "2",
                                        "--requests", "6", "--endpoint", "chat", "--prompt-tokens", "8",
                                        "--no-ignore-eos", "--timeout", "10"], env={"KVGATE_API_KEY": "k"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    _check_ok(orjson.loads(lines[0]), 6)
    assert server.requests == 6 and "ignore_eos" not in server.last_body and server.last_auth == "Bearer k"


def test_seed_picks_the_prompts(server):
    """A warm-up round with another seed must not send the measured round's prompts (the server would serve
    them from its prefix cache)."""
    def prompt_of(seed):
        args = ["--url", f"http://127.0.0.1:{server.port}", "--concurrency", "1", "--requests", "1",
                "--prompt-tokens", "8", "--timeout", "10", "--seed", str(seed)]
        assert CliRunner().invoke(load, args).exit_code == 0
        return server.last_body["prompt"]

    first = prompt_of(0)
    assert prompt_of(0) == first and prompt_of(1) != first
