"""A fake OpenAI-compatible streaming server (aiohttp, no model): for the load generator's tests and for measuring
the load generator alone, with a server that is never the bottleneck.

Each request streams `max_tokens` content chunks of one token (" tok"), then a usage chunk, then
`data: [DONE]`. The model name picks a behaviour: `fake` (that), `nousage` (no usage chunk), `packed` (two
tokens a chunk; usage says how many), `fail500` (HTTP 500), `flaky` (every 4th request HTTP 429), `cut` (the
connection closes after two chunks), `slow` (nothing for 30 s), `busy` (HTTP 503 while `capacity` requests are
already in flight). `delay_s` paces the chunks; `chunks_per_write` groups them into one write.

    python -m bench.fake_openai --port 8300 [--delay-ms 0] [--chunks-per-write 1]
"""

from __future__ import annotations

import asyncio
import threading
import time

import orjson
from aiohttp import web

MODELS = ("fake", "nousage", "packed", "fail500", "flaky", "cut", "slow", "busy")


class FakeOpenAI:
    def __init__(self, *, delay_s: float = 0.0, chunks_per_write: int = 1, capacity: int = 2,
                 first_delay_s: float = 0.0) -> None:
        self.delay_s, self.chunks_per_write, self.capacity = delay_s, chunks_per_write, capacity
        self.first_delay_s = first_delay_s
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.arrivals: list[float] = []  # perf_counter at each request's arrival
        self.bodies: list[dict] = []
        self.auth: str | None = None
        self.port = 0
        self._thread: threading.Thread | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/info", self.info)
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        return app

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in MODELS]
        return web.json_response({"object": "list", "data": data})

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_id": "fake", "max_batch_total_tokens": 4096, "max_num_seqs": 8})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.perf_counter())
        body = orjson.loads(await request.read())
        self.requests += 1
        self.bodies.append(body)
        self.auth = request.headers.get("Authorization")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request, body)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, body: dict) -> web.StreamResponse:
        model = body.get("model")
        if model == "fail500" or (model == "flaky" and self.requests % 4 == 0) or (
                model == "busy" and self.in_flight > self.capacity):
            status = {"fail500": 500, "flaky": 429, "busy": 503}[model]
            return web.json_response({"error": {"message": f"{model} says no", "type": "server_error",
                                                "param": None, "code": status}}, status=status)
        chat = request.path.endswith("/chat/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if model == "slow":
            await asyncio.sleep(30)
        if self.first_delay_s:
            await asyncio.sleep(self.first_delay_s)
        n = int(body.get("max_tokens") or 16)
        per_chunk = 2 if model == "packed" else 1
        head = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
                "model": model}
        piece = " tok" * per_chunk
        choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                  else {"index": 0, "text": piece, "finish_reason": None, "logprobs": None})
        line = b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"
        chunks = -(-n // per_chunk)
        sent = 0
        while sent < chunks:
            k = min(self.chunks_per_write, chunks - sent)
            if model == "cut" and sent + k > 2:
                await resp.write(line * (2 - sent))
                await asyncio.sleep(0.01)
                request.transport.close()  # mid-stream: no last chunk, no [DONE]
                raise asyncio.CancelledError
            await resp.write(line * k)
            sent += k
            if self.delay_s:
                await asyncio.sleep(self.delay_s * k)
        if model != "nousage":
            usage = {"prompt_tokens": _prompt_len(body), "completion_tokens": n, "total_tokens": _prompt_len(body) + n}
            await resp.write(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def start_thread(self) -> "FakeOpenAI":
        """Serve on 127.0.0.1 (a free port, self.port) from a thread of its own; stop() ends it."""
        runner = web.AppRunner(self.app(), shutdown_timeout=0.5)
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            self.port = runner.addresses[0][1]
            started.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._loop, self._thread = loop, threading.Thread(target=serve, daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the fake server did not start")
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _prompt_len(body: dict) -> int:
    if "prompt" in body:
        p = body["prompt"]
        return len(p) if isinstance(p, list) else len(str(p).split())
    return sum(len(str(m.get("content", "")).split()) for m in body.get("messages", ()))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause after each chunk")
    parser.add_argument("--chunks-per-write", type=int, default=1)
    args = parser.parse_args()
    fake = FakeOpenAI(delay_s=args.delay_ms / 1000, chunks_per_write=args.chunks_per_write)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(fake.app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
