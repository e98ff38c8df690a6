"""Bad requests fail at submit time with precise, typed errors — and the engine keeps serving everyone else."""

from __future__ import annotations

import asyncio

import pytest

from engine import LLM, AsyncLLM, SamplingParams
from engine.errors import ContextTooLongError, InvalidRequestError
from engine.sampling_params import MAX_LOGPROBS, MAX_N, MAX_TEMPERATURE
from tests.checkpoints import hf_greedy

pytestmark = pytest.mark.usefixtures("deadline")

MAX_LEN = 64
GOOD = [5, 6, 7, 8, 9]
GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=6)


@pytest.fixture(scope="module")
def expected(tiny_qwen2_dir):
    return hf_greedy(tiny_qwen2_dir, [GOOD], 6)[0]


@pytest.fixture(scope="module")
def llm(tiny_qwen2_dir):
    # qwen2: the model's vocabulary (576) is larger than the tokenizer's (512)
    engine = LLM(str(tiny_qwen2_dir), in_process=True, num_kv_blocks=64, block_size=8, max_model_len=MAX_LEN)
    yield engine
    engine.shutdown()


def _assert_serving(llm, expected) -> None:
    [out] = llm.generate([GOOD], GREEDY, use_tqdm=False)
    assert out.outputs[0].token_ids == expected
    stats = llm.last_stats
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    assert not llm.output_processor.requests  # nothing of the bad request left behind in the front end


BAD_PROMPTS = [
    pytest.param("", InvalidRequestError, "prompt must not be empty", id="empty-text"),
    pytest.param([], InvalidRequestError, "prompt", id="empty-ids"),
    pytest.param([5, -1, 6], InvalidRequestError, r"token id -1 is outside the vocabulary \[0, 576\)", id="negative"),
    pytest.param([5, 576], InvalidRequestError, r"token id 576 is outside the vocabulary", id="vocab-size"),
    pytest.param([5, 10**12], InvalidRequestError, r"token id 1000000000000 is outside", id="huge"),
    pytest.param([5, 6.0], InvalidRequestError, r"token id 6\.0", id="float"),
    pytest.param([5, "6"], InvalidRequestError, r"token id '6'", id="str-id"),
    pytest.param([5, True], InvalidRequestError, r"token id True", id="bool"),
    pytest.param([5, None], InvalidRequestError, r"token id None", id="none"),
    pytest.param(list(range(4, 4 + MAX_LEN)), ContextTooLongError,
                 rf"maximum context length is {MAX_LEN} tokens\. However, your prompt has {MAX_LEN} tokens",
                 id="prompt-fills-context"),
    pytest.param(list(range(4, 4 + 200)), ContextTooLongError, "your prompt has 200 tokens", id="prompt-too-long"),
    pytest.param("hello " * 100, ContextTooLongError, "maximum context length", id="text-too-long"),
]


@pytest.mark.parametrize("prompt, error, message", BAD_PROMPTS)
def test_bad_prompt(llm, expected, prompt, error, message):
    with pytest.raises(error, match=message) as info:
        llm.generate([prompt], GREEDY, use_tqdm=False)
    assert isinstance(info.value, ValueError)
    assert info.value.param == "prompt"
    _assert_serving(llm, expected)


def test_prompt_plus_max_tokens_over_context(llm, expected):
    prompt = list(range(4, 4 + MAX_LEN - 5))  # 59 tokens: room for 5
    with pytest.raises(ContextTooLongError, match=r"requested 65 tokens \(59 in the prompt, 6 in the completion\)") \
            as info:
        llm.generate([prompt], GREEDY, use_tqdm=False)
    assert info.value.param == "max_tokens"
    _assert_serving(llm, expected)
    # exactly at the limit is fine, and max_tokens=None means "up to the context length"
    [out] = llm.generate([prompt], SamplingParams(temperature=0, ignore_eos=True, max_tokens=5), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"
    [out] = llm.generate([prompt], SamplingParams(temperature=0, ignore_eos=True, max_tokens=None), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_bad_request_in_a_batch_submits_nothing(llm, expected):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([GOOD, [5, 9999], GOOD], GREEDY, use_tqdm=False)
    _assert_serving(llm, expected)


@pytest.mark.parametrize("params, error, message", [
    pytest.param(SamplingParams(logit_bias={576: 5.0}), InvalidRequestError, "logit_bias token id 576",
                 id="logit-bias-outside-vocab"),
    pytest.param({"temperature": 0}, InvalidRequestError, "SamplingParams", id="not-sampling-params"),
])
def test_bad_params_at_submit(llm, expected, params, error, message):
    with pytest.raises(error, match=message):
        llm.generate([GOOD], params, use_tqdm=False)
    _assert_serving(llm, expected)


@pytest.mark.parametrize("field, bad, edge", [
    ("n", MAX_N + 1, MAX_N), ("n", 0, 1), ("temperature", MAX_TEMPERATURE + 0.5, MAX_TEMPERATURE),
    ("temperature", -0.1, 0.0), ("top_p", 0.0, 1e-6), ("top_p", 1.01, 1.0), ("top_k", -2, -1),
    ("top_k", 2**31, 2**31 - 1), ("min_p", 1.1, 1.0), ("seed", 2**64, 2**64 - 1), ("seed", -(2**63) - 1, -(2**63)),
    ("max_tokens", 0, 1), ("max_tokens", 2**31, 2**31 - 1), ("min_tokens", -1, 0), ("stop", [""], ["x"]),
    ("stop", ["x", 5], "x"), ("stop_token_ids", [-1], [0]), ("presence_penalty", 2.1, 2.0),
    ("frequency_penalty", -2.1, -2.0), ("repetition_penalty", 0.0, 2.0), ("logit_bias", {5: 100.5}, {5: 100.0}),
    ("logit_bias", {"x": 1.0}, {"5": 1.0}), ("logit_bias", {-1: 1.0}, {0: -100.0}),
    ("logprobs", MAX_LOGPROBS + 1, MAX_LOGPROBS), ("logprobs", -1, 0),
])
def test_sampling_params_bounds_name_their_field(field, bad, edge):
    """The engine's own bounds (wider than OpenAI's in places: temperature), each refused by name at its edge."""
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: bad})
    assert info.value.param == field, info.value
    SamplingParams(**{field: edge})


@pytest.mark.parametrize("params, field", [(dict(min_tokens=5, max_tokens=4), "min_tokens"),
                                           (dict(stop="x", detokenize=False), "stop")])
def test_sampling_params_combinations_name_their_field(params, field):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**params)
    assert info.value.param == field


def test_engine_edges_run(llm):
    """The engine's edges are served, not only accepted: MAX_LOGPROBS alternatives, MAX_TEMPERATURE."""
    sp = SamplingParams(temperature=MAX_TEMPERATURE, logprobs=MAX_LOGPROBS, max_tokens=2, seed=1)
    [out] = llm.generate([GOOD], sp, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 2
    assert all(len(entry) >= MAX_LOGPROBS for entry in out.outputs[0].logprobs)


def test_sampling_params_count_mismatch(llm, expected):
    with pytest.raises(ValueError, match="sampling_params has 2 entries for 3 prompts"):
        llm.generate([GOOD] * 3, [GREEDY] * 2, use_tqdm=False)
    _assert_serving(llm, expected)


@pytest.mark.parametrize("conversations", [[[]], [[{"role": "user", "content": "hi"}], []]],
                         ids=["empty-conversation", "second-empty"])
def test_bad_chat_messages(llm, expected, conversations):
    with pytest.raises(InvalidRequestError, match="messages must be a non-empty list") as info:
        llm.chat(conversations, GREEDY, use_tqdm=False)
    assert info.value.param == "messages"
    _assert_serving(llm, expected)
    [out] = llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)
    assert out.finished and len(out.outputs[0].token_ids) == 6


def test_request_larger_than_the_kv_pool(tiny_qwen2_dir):
    """A request that could never fit the KV pool is refused up front instead of waiting forever."""
    with LLM(str(tiny_qwen2_dir), in_process=True, num_kv_blocks=4, block_size=8) as engine:  # 32 tokens
        with pytest.raises(ContextTooLongError, match="KV cache"):
            engine.generate([list(range(4, 34))], GREEDY, use_tqdm=False)  # 30 + 6 > 32
        [out] = engine.generate([list(range(4, 30))], GREEDY, use_tqdm=False)  # 26 + 6 = 32 fits
        assert len(out.outputs[0].token_ids) == 6


@pytest.mark.parametrize("in_process", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["in-process", "subprocess"])
def test_unknown_model_path(tmp_path, in_process):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="no-such-model"):
        LLM(str(missing), in_process=in_process)


def test_directory_without_weights(tmp_path, tiny_qwen2_dir):
    (tmp_path / "config.json").write_text((tiny_qwen2_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=str(tmp_path.name)):
        LLM(str(tmp_path), in_process=True)


def test_async_bad_request_fails_alone(tiny_qwen2_dir, expected):
    async def main():
        engine = AsyncLLM(str(tiny_qwen2_dir), in_process=True, num_kv_blocks=64, block_size=8,
                          max_model_len=MAX_LEN)
        try:
            async def run(prompt, max_tokens=6):
                final = None
                sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)
                async for out in engine.generate(prompt, sp):
                    final = out
                return final

            prompts = [GOOD, list(range(4, 200)), GOOD, [5, -3], GOOD, ""]
            results = await asyncio.gather(*(run(p) for p in prompts), return_exceptions=True)
            # one whose prompt + max_tokens exceeds the context, submitted while the others run
            late = await asyncio.gather(run(GOOD, max_tokens=MAX_LEN), run(GOOD), return_exceptions=True)
            after = await run(GOOD)
            stats = engine.last_stats
            return results, late, after, stats
        finally:
            engine.shutdown()

    results, late, after, stats = asyncio.run(main())
    assert isinstance(results[1], ContextTooLongError)
    assert isinstance(results[3], InvalidRequestError) and "-3" in str(results[3])
    assert isinstance(results[5], InvalidRequestError) and "empty" in str(results[5])
    for good in (results[0], results[2], results[4], late[1], after):
        assert good.finished and good.outputs[0].token_ids == expected
    assert isinstance(late[0], ContextTooLongError) and late[0].param == "max_tokens"
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)


def test_text_tokenized_beyond_the_model_vocabulary_is_refused(tiny_tokenizer):
    """A tokenizer with more tokens than the model's embedding: the ids are checked, not trusted."""
    from engine.processor import InputProcessor
    from engine.protocol import EngineInfo

    info = EngineInfo("m", "float32", "cpu", max_model_len=64, num_kv_blocks=8, block_size=8, vocab_size=10,
                      max_batch_total_tokens=64)
    processor = InputProcessor(tiny_tokenizer, info, eos_ids=[0])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary") as info_:
        processor.tokenize("hello world")
    assert info_.value.param == "prompt"
