"""The embedded default model (SmolLM2-135M-Instruct, converted once from its GGUF into ~/.cache/kvgate): one real
end-to-end check that it answers, and that streamed multi-byte text never shows half a character."""

from __future__ import annotations

import asyncio

import pytest

from engine import LLM, AsyncLLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deadline")]


def test_capital_of_france():
    with LLM() as llm:  # everything default: the embedded model, the engine core in its own process
        [out] = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                         SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    completion = out.outputs[0]
    assert "Paris" in completion.text, completion.text
    assert completion.finish_reason in ("stop", "length")
    assert out.prompt is not None and "What is the capital of France?" in out.prompt


@pytest.mark.parametrize("message", ["日本の首都はどこですか？", "Reply with three emoji 🙂🚀"])
def test_streamed_multibyte_text_is_never_cut(message):
    async def main():
        engine = AsyncLLM(in_process=True, num_kv_blocks=256)
        try:
            prompt = engine.chat_prompt([{"role": "user", "content": message}])
            sp = SamplingParams(temperature=0, max_tokens=32)
            outs = [out async for out in engine.generate(engine.tokenize_chat(prompt), sp)]
            return outs, engine.tokenizer
        finally:
            engine.shutdown()

    outs, tokenizer = asyncio.run(main())
    texts = [o.outputs[0].text for o in outs]
    final = outs[-1].outputs[0]
    assert len(outs) >= 3 and outs[-1].finished
    for text in texts:
        assert "\ufffd" not in text, f"half a character streamed: {text!r}"
    # the whole text, less a character that max_tokens cut in half (dropped, by design, not shown as U+FFFD)
    assert final.text == tokenizer.decode(final.token_ids, skip_special_tokens=True).rstrip("\ufffd")
    assert any(ord(c) > 0x2FFF for c in final.text), f"no multi-byte character generated: {final.text!r}"
    # several tokens decode alone to half a character: the stream really had to hold text back
    assert sum("\ufffd" in tokenizer.decode([t]) for t in final.token_ids) >= 2
    for a, b in zip(texts, texts[1:]):
        assert b.startswith(a)
