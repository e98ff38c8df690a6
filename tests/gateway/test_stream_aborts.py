"""A stream that ends without its answer is counted by cause, wherever it ends: a client leaving at the very first
chunk (a chat stream's role chunk, a completion's echo), or the server aborting it as it shuts down. Driven on the
service itself, so the moment of leaving is exact."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from engine import AsyncLLM
from gateway.schemas import ChatCompletionRequest, CompletionRequest, Message
from gateway.serving import Service


@pytest.fixture
def service(tiny_llama_dir):
    engine = AsyncLLM(str(tiny_llama_dir))
    service = Service(engine, ["tiny"])
    service.causes = []
    service.on_aborted = service.causes.append
    yield service
    engine.shutdown()


def _long(**fields) -> dict:
    return {"model": "tiny", "max_tokens": 60, "ignore_eos": True, "stream": True, "temperature": 0, **fields}


def _events(chunks: list[bytes]) -> list:
    return [orjson.loads(c[6:]) for c in chunks if c.startswith(b"data: {")]


def test_leaving_at_the_first_chunk_is_counted(service):
    jobs = [service.chat_job(ChatCompletionRequest(messages=[Message(role="user", content="hi")], **_long())),
            service.completion_job(CompletionRequest(prompt="hello there", echo=True, **_long()))]

    async def body():
        for job in jobs:
            events = service.stream(job)
            first = _events([await events.__anext__()])[0]
            assert first["choices"][0].get("delta", {}).get("role") == "assistant" or first["choices"][0]["text"]
            await events.aclose()  # the client is gone: the stream is closed at its first chunk
        await asyncio.sleep(0.1)
        assert not service.engine._streams  # and its engine requests were never left running

    asyncio.run(body())
    assert service.causes == ["client_disconnect", "client_disconnect"]


def test_a_stream_aborted_by_a_shutdown_is_counted(service):
    job = service.completion_job(CompletionRequest(prompt="hello there", **_long(max_tokens=200)))

    async def body():
        events = service.stream(job)
        chunks = [await events.__anext__()]  # generation has begun
        await service.engine.abort_all()  # what the server does once the grace period is over
        chunks += [c async for c in events]
        return chunks

    chunks = asyncio.run(body())
    assert chunks[-1] == b"data: [DONE]\n\n"
    assert _events(chunks)[-1]["error"]["code"] == "aborted"
    assert service.causes == ["shutdown"]
