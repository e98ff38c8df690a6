"""When the engine core process dies, requests fail with EngineDeadError at once: nothing hangs."""

from __future__ import annotations

import asyncio

import pytest

from engine import LLM, AsyncLLM, EngineDeadError, SamplingParams

LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


def test_sync_generate_raises_when_the_core_is_gone(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir))
    try:
        llm.client._process.kill()
        llm.client._process.join(timeout=10)
        with pytest.raises(EngineDeadError):
            llm.generate([[5, 6, 7]], LONG, use_tqdm=False)
    finally:
        llm.shutdown()


def test_streams_in_flight_end_with_an_error(tiny_llama_dir):
    engine = AsyncLLM(str(tiny_llama_dir))

    async def body():
        seen = []

        async def consume(request_id):
            async for out in engine.generate([5, 6, 7], LONG, request_id=request_id):
                seen.append(out)
                if len(seen) == 2:
                    engine.client._process.kill()

        results = await asyncio.wait_for(asyncio.gather(consume("a"), consume("b"), return_exceptions=True), 30)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert not engine.is_running
        with pytest.raises(EngineDeadError):  # later requests fail at once too
            async for _ in engine.generate([5, 6], LONG):
                pass

    try:
        asyncio.run(body())
    finally:
        engine.shutdown()
