"""Each request is prepared exactly once on its way in: tokenized once, its params completed once
(InputProcessor.prepare_params) and never validated again (SamplingParams.__post_init__), whichever front door
it comes through; a request prepared beforehand is not prepared again."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from engine import LLM, AsyncLLM, SamplingParams
from engine.processor import InputProcessor

pytestmark = pytest.mark.usefixtures("deadline")

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """Calls of tokenize, prepare_params, apply_chat_template and of SamplingParams validation, from now on."""
    counter: Counter = Counter()
    for name in ("tokenize", "prepare_params", "apply_chat_template"):
        original = getattr(InputProcessor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counter[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(InputProcessor, name, counted)
    validate = SamplingParams.__post_init__

    def validated(self):
        counter["validate"] += 1
        validate(self)

    monkeypatch.setattr(SamplingParams, "__post_init__", validated)
    return counter


def _sp() -> SamplingParams:
    return SamplingParams(n=2, temperature=0.5, seed=3, max_tokens=2, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    engine = LLM(str(tiny_llama_dir), in_process=True, num_kv_blocks=64, block_size=8)
    yield engine
    engine.shutdown()


def test_llm_generate(llm, calls):
    sp = _sp()
    prepared = llm.prepare("hello", sp)
    assert calls == {"validate": 1, "tokenize": 1, "prepare_params": 1}  # validated when built, not after
    calls.clear()
    outs = llm.generate([prepared, [5, 6, 7]], sp, use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [2, 2]
    assert calls == {"tokenize": 1, "prepare_params": 1}  # the unprepared prompt only


def test_llm_chat(llm, calls):
    outs = llm.chat([CHAT, CHAT], _sp(), use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [2, 2] and outs[0].prompt  # the template's text is kept
    assert calls == {"validate": 1, "apply_chat_template": 2, "tokenize": 2, "prepare_params": 2}


def test_async_generate_and_complete(tiny_llama_dir, calls):
    async def main():
        engine = AsyncLLM(str(tiny_llama_dir), in_process=True, num_kv_blocks=64, block_size=8)
        try:
            calls.clear()  # the engine's warmup builds SamplingParams of its own
            sp = _sp()
            prepared = engine.prepare("hello", sp)
            chat = engine.prepare_chat(CHAT, sp)
            before = dict(calls)
            finals = [[out async for out in engine.generate(prepared)][-1], await engine.complete(chat)]
            assert dict(calls) == before  # prepared already: nothing done again
            finals += [[out async for out in engine.generate([5, 6, 7], sp)][-1], await engine.complete("hi", sp)]
            return before, finals
        finally:
            engine.shutdown()

    before, finals = asyncio.run(main())
    assert before == {"validate": 1, "apply_chat_template": 1, "tokenize": 2, "prepare_params": 2}
    assert all(out.finished and len(out.outputs) == 2 for out in finals)
    assert calls == {"validate": 1, "apply_chat_template": 1, "tokenize": 4, "prepare_params": 4}


def test_gateway_chat_job(tiny_llama_dir, calls):
    """The HTTP and batch path: a chat request is tokenized and prepared once."""
    from gateway.schemas import ChatCompletionRequest, Message
    from gateway.serving import Service

    engine = AsyncLLM(str(tiny_llama_dir), in_process=True, num_kv_blocks=64, block_size=8)
    try:
        calls.clear()  # the engine's warmup builds SamplingParams of its own
        req = ChatCompletionRequest(model="m", messages=[Message(role="user", content="hi")], n=2, max_tokens=2)
        job = Service(engine, ["m"]).chat_job(req)
        assert len(job.prompts[0].children) == 2 and job.prompts[0].text
        assert calls == {"validate": 1, "apply_chat_template": 1, "tokenize": 1, "prepare_params": 1}
    finally:
        engine.shutdown()
