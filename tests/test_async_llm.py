"""AsyncLLM: streaming (cumulative outputs, one per step), concurrency, abort (explicit, by leaving the loop, by
cancellation) freeing everything in the engine, duplicate request ids, and the subprocess engine."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine import LLM, AsyncLLM, SamplingParams
from tests.checkpoints import hf_greedy

pytestmark = pytest.mark.usefixtures("deadline")

PROMPT = "The capital of France is"
LONG = 900  # tokens: far more than a test waits for before aborting


def _run(model_dir, body, **engine_kwargs):
    """asyncio.run(body(engine)) with an AsyncLLM created inside the loop and shut down after."""
    kwargs = dict(in_process=True, num_kv_blocks=128, block_size=8)
    kwargs.update(engine_kwargs)

    async def main():
        engine = AsyncLLM(str(model_dir), **kwargs)
        try:
            return await body(engine)
        finally:
            engine.shutdown()

    return asyncio.run(main())


async def _collect(engine, prompt, sp, request_id=None) -> list:
    return [out async for out in engine.generate(prompt, sp, request_id=request_id)]


async def _idle(engine, timeout=3.0):
    """Wait until the engine reports nothing running or waiting and an empty KV pool; return its stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.last_stats
        if (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"engine still busy {timeout} s after the abort: {stats}")
        await asyncio.sleep(0.01)


def _count_steps(engine) -> list[int]:
    """A one-element list holding the number of engine steps run so far (in-process engines)."""
    core, counter = engine.client.core, [0]
    step = core.step

    def counted():
        counter[0] += 1
        return step()

    core.step = counted
    return counter


async def _stops_soon(engine, steps) -> None:
    """After a request was abandoned: the engine goes idle within a few steps, not after the LONG tokens the
    request would otherwise run for."""
    before = steps[0]
    await _idle(engine)
    assert steps[0] - before < LONG // 10, f"{steps[0] - before} steps after the request was abandoned"
    _assert_clean(engine)


def _assert_clean(engine) -> None:
    """In-process engines: nothing left of any request in the core or the front end."""
    core = engine.client.core
    assert not core.scheduler.running and not core.scheduler.waiting
    core.scheduler.check_integrity()
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    assert not engine.output_processor.requests and not engine._streams


@pytest.fixture(scope="module")
def greedy_reference(tiny_llama_dir):
    """LLM's greedy output of PROMPT (12 tokens), and HF's tokens."""
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12)
    with LLM(str(tiny_llama_dir), in_process=True, num_kv_blocks=64) as llm:
        [out] = llm.generate(PROMPT, sp, use_tqdm=False)
    assert out.outputs[0].token_ids == hf_greedy(tiny_llama_dir, [out.prompt_token_ids], 12)[0]
    return out.outputs[0]


def _assert_streamed(outs, final_text, n_tokens) -> None:
    assert len(outs) >= 3, "not streamed: fewer than 3 yields"
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(set(lengths)) and lengths[-1] == n_tokens, lengths  # grows every yield
    texts = [o.outputs[0].text for o in outs]
    for a, b in zip(texts, texts[1:]):
        assert b.startswith(a), f"cumulative text went back: {a!r} -> {b!r}"
    assert len(set(texts)) >= 3, texts
    assert texts[-1] == final_text


def test_streaming_is_incremental_and_equals_llm(tiny_llama_dir, greedy_reference):
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12)

    async def body(engine):
        return await _collect(engine, PROMPT, sp, request_id="stream-1")

    outs = _run(tiny_llama_dir, body)
    assert {o.request_id for o in outs} == {"stream-1"}
    _assert_streamed(outs, greedy_reference.text, 12)
    assert outs[-1].outputs[0].token_ids == greedy_reference.token_ids
    assert outs[-1].outputs[0].finish_reason == "length"
    assert outs[-1].metrics.first_token_time is not None and outs[-1].metrics.finished_time is not None


def test_delta_outputs_add_up_and_a_slow_reader_gets_steps_merged(tiny_llama_dir, greedy_reference):
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12, logprobs=1)

    async def body(engine):
        outs = []
        async for out in engine.generate(PROMPT, sp, delta=True):
            outs.append(out)
            if len(outs) == 2:
                await asyncio.sleep(0.3)  # the engine runs on: the next output holds several steps' tokens
        return outs

    outs = _run(tiny_llama_dir, body)
    deltas = [o.outputs[0] for o in outs]
    assert "".join(d.text for d in deltas) == greedy_reference.text
    assert [t for d in deltas for t in d.token_ids] == greedy_reference.token_ids
    assert [len(d.logprobs) for d in deltas] == [len(d.token_ids) for d in deltas]
    assert len(deltas[2].token_ids) > 1 and deltas[-1].finish_reason == "length"


def test_streaming_with_a_stop_string_never_takes_text_back(tiny_llama_dir, greedy_reference):
    text = greedy_reference.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12, stop=stop)

    async def body(engine):
        return await _collect(engine, PROMPT, sp)

    outs = _run(tiny_llama_dir, body)
    final = outs[-1].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert final.text == text[: text.find(stop)]
    for o in outs:
        assert final.text.startswith(o.outputs[0].text)  # held back, never shown then retracted


def test_concurrent_requests(tiny_llama_dir):
    prompts = [[4 + i] * (1 + 7 * i) for i in range(8)]  # 1..50 tokens
    max_tokens = [3 + 2 * i for i in range(8)]
    expected = [hf_greedy(tiny_llama_dir, [p], m)[0] for p, m in zip(prompts, max_tokens)]
    events = []

    async def one(i):
        sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens[i])
        last = None
        async for out in engine_ref[0].generate(prompts[i], sp, request_id=f"r{i}"):
            events.append((i, out.finished))
            last = out
        return last

    engine_ref = []

    async def body(engine):
        engine_ref.append(engine)
        results = await asyncio.gather(*(one(i) for i in range(8)))
        await _idle(engine)
        _assert_clean(engine)
        return results

    results = _run(tiny_llama_dir, body, max_num_batched_tokens=32)
    assert [r.outputs[0].token_ids for r in results] == expected
    assert [r.request_id for r in results] == [f"r{i}" for i in range(8)]
    # They really ran together: some request streamed while another had started and not finished.
    in_flight, peak = set(), 0
    for i, finished in events:
        in_flight.add(i)
        peak = max(peak, len(in_flight))
        if finished:
            in_flight.discard(i)
    assert peak >= 4


async def _first_tokens(agen, count):
    """Consume `count` outputs of agen (an async generator left open)."""
    outs = []
    async for out in agen:
        outs.append(out)
        if len(outs) == count:
            break
    return outs


def test_abort_mid_stream_frees_the_request(tiny_llama_dir):
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=LONG)

    async def body(engine):
        steps = _count_steps(engine)
        outs = []
        async for out in engine.generate(PROMPT, sp, request_id="victim"):
            outs.append(out)
            if len(outs) == 3:
                await engine.abort("victim")
        await _stops_soon(engine, steps)
        # the engine goes on serving, and the id is free again
        after = await _collect(engine, PROMPT, SamplingParams(temperature=0, ignore_eos=True, max_tokens=4),
                               request_id="victim")
        return outs, after, engine.last_stats

    outs, after, last = _run(tiny_llama_dir, body)
    final = outs[-1]
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert len(outs) <= 4 and len(final.outputs[0].token_ids) < LONG
    assert after[-1].finished and len(after[-1].outputs[0].token_ids) == 4
    assert (last.num_running, last.num_waiting, last.kv_cache_usage) == (0, 0, 0.0)


def test_abort_of_unknown_or_finished_request_is_harmless(tiny_llama_dir):
    async def body(engine):
        await engine.abort("never-existed")
        outs = await _collect(engine, PROMPT, SamplingParams(max_tokens=3), request_id="done")
        await engine.abort("done")
        return outs

    outs = _run(tiny_llama_dir, body)
    assert outs[-1].outputs[0].finish_reason == "length"


def test_leaving_the_loop_early_aborts(tiny_llama_dir):
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=LONG)

    async def body(engine):
        steps = _count_steps(engine)
        seen = 0
        async for _ in engine.generate(PROMPT, sp, request_id="leaver"):
            seen += 1
            if seen == 3:
                break  # the generator is dropped: its finalizer (aclose) aborts the request
        await _stops_soon(engine, steps)

        agen = engine.generate(PROMPT, sp, request_id="closer")
        await _first_tokens(agen, 2)
        await agen.aclose()  # explicit close, as a server does when the client goes away
        await _stops_soon(engine, steps)

        async def consume():
            async for _ in engine.generate(PROMPT, sp, request_id="cancelled"):
                pass

        task = asyncio.create_task(consume())
        while "cancelled" not in engine.output_processor.requests or \
                not engine.output_processor.requests["cancelled"].completions[0].token_ids:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _stops_soon(engine, steps)
        return engine.last_stats

    stats = _run(tiny_llama_dir, body)
    assert stats.num_running == 0


def test_duplicate_live_request_id(tiny_llama_dir, greedy_reference):
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12)

    async def body(engine):
        first = engine.generate(PROMPT, sp, request_id="same")
        outs = await _first_tokens(first, 1)
        with pytest.raises(ValueError, match="same"):
            await _collect(engine, PROMPT, sp, request_id="same")
        outs += [out async for out in first]  # the first one is untouched by the refused duplicate
        again = await _collect(engine, PROMPT, sp, request_id="same")  # finished: the id may be reused
        return outs, again

    outs, again = _run(tiny_llama_dir, body)
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == greedy_reference.token_ids
    assert again[-1].outputs[0].token_ids == greedy_reference.token_ids


def test_n_streams_every_completion(tiny_llama_dir):
    sp = SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=6, ignore_eos=True)

    async def body(engine):
        return await _collect(engine, PROMPT, sp)

    outs = _run(tiny_llama_dir, body)
    final = outs[-1]
    assert final.finished and [c.index for c in final.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in final.outputs)
    assert not any(o.finished for o in outs[:-1])


def test_one_engine_per_event_loop(tiny_llama_dir):
    """A second asyncio.run on the same AsyncLLM is refused at once (its outputs would go to the first, closed
    loop and the request would wait forever)."""
    engine = AsyncLLM(str(tiny_llama_dir), in_process=True, num_kv_blocks=64)
    sp = SamplingParams(max_tokens=3)
    try:
        first = asyncio.run(_collect(engine, PROMPT, sp))
        assert first[-1].finished

        async def second():
            return await asyncio.wait_for(_collect(engine, PROMPT, sp), timeout=10)

        with pytest.raises(RuntimeError, match="event loop"):
            asyncio.run(second())
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_subprocess_streaming_and_abort(tiny_llama_dir, greedy_reference):
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=12)

    async def body(engine):
        assert engine.client.__class__.__name__ == "ProcessClient"
        outs = await _collect(engine, PROMPT, sp)
        long = []
        async for out in engine.generate(PROMPT, SamplingParams(temperature=0, ignore_eos=True, max_tokens=LONG),
                                         request_id="long"):
            long.append(out)
            if len(long) == 3:
                await engine.abort("long")
        stats = await _idle(engine, timeout=10)
        both = await asyncio.gather(_collect(engine, PROMPT, sp), _collect(engine, [5, 6, 7], sp))
        return outs, long, stats, both

    outs, long, stats, both = _run(tiny_llama_dir, body, in_process=False)
    _assert_streamed(outs, greedy_reference.text, 12)
    assert outs[-1].outputs[0].token_ids == greedy_reference.token_ids
    assert long[-1].outputs[0].finish_reason == "abort" and len(long[-1].outputs[0].token_ids) < LONG
    assert stats.num_running == 0
    assert both[0][-1].outputs[0].token_ids == greedy_reference.token_ids
