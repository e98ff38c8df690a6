"""Structured output through the whole engine: what comes back parses and validates (hundreds of generations on
tiny random-weight models, checked with jsonschema), constrained and free requests share a batch without
touching each other, and a grammar that cannot be compiled is refused with its field named."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from engine import LLM, AsyncLLM, InvalidRequestError, SamplingParams, StructuredOutputsParams
from engine.structured_output import GrammarCache, spec_key

pytestmark = pytest.mark.usefixtures("deadline")

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "admin": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string",
                                                                               "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
    },
    "required": ["name", "age", "admin", "address", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["hello there", "a b c d", "the the the", "Give me JSON:"]


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def llm(request, tiny_checkpoint):
    engine = LLM(str(tiny_checkpoint(request.param)), in_process=True, num_kv_blocks=512, block_size=16)
    yield engine
    engine.shutdown()


def _json(schema=NESTED, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 200)
    return SamplingParams(structured_outputs=StructuredOutputsParams(json=schema), **kw)


def _completions(outputs):
    return [c for out in outputs for c in out.outputs]


def _assert_valid(completions, schema) -> int:
    """Every completion validates unless max_tokens cut it; returns how many were cut."""
    cut = 0
    for c in completions:
        if c.finish_reason == "length":
            cut += 1
            continue
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), schema)
    return cut


def test_hundreds_of_sampled_generations_validate(llm):
    """200 completions at temperature 1 (n=25 of 8 prompts): each parses and validates against the schema."""
    outputs = llm.generate(PROMPTS + [p + "!" for p in PROMPTS], _json(n=25, temperature=1.0, seed=7), use_tqdm=False)
    completions = _completions(outputs)
    assert len(completions) == 200
    cut = _assert_valid(completions, NESTED)
    assert cut < 20, f"{cut} of 200 ran out of tokens: the grammar should end them"
    assert len({c.text for c in completions}) > 100  # sampled, not one answer copied


def test_filters_penalties_logprobs_and_greedy_keep_working(llm):
    params = [
        _json(temperature=0.0, logprobs=3),
        _json(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=1, n=3),
        _json(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, seed=2),
        _json(temperature=1.0, logit_bias={5: 5.0}, seed=3),
    ]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    _assert_valid(_completions(outputs), NESTED)
    greedy = outputs[0].outputs[0]
    assert len(greedy.logprobs) == len(greedy.token_ids)  # the model's logprobs, one entry per token
    assert all(len(entry) >= 1 for entry in greedy.logprobs)


def test_length_cut_says_length(llm):
    [out] = llm.generate("hello", _json(max_tokens=3), use_tqdm=False)
    c = out.outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 3
    with pytest.raises(ValueError):
        json.loads(c.text)


def test_regex_choice_grammar_and_json_object(llm):
    regex = r"[a-z]{3}-[0-9]{2,4}"
    choices = ["positive", "negative", "neutral"]
    grammar = 'start: "(" item ("," item)* ")"\nitem: /[0-9]+/'
    specs = [StructuredOutputsParams(regex=regex), StructuredOutputsParams(choice=choices),
             StructuredOutputsParams(grammar=grammar), StructuredOutputsParams(json_object=True)]
    params = [SamplingParams(n=10, temperature=1.0, seed=i, max_tokens=40, structured_outputs=s)
              for i, s in enumerate(specs)]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    finished = [[c.text for c in out.outputs if c.finish_reason == "stop"] for out in outputs]
    assert all(len(texts) >= 5 for texts in finished[:3])
    assert all(re.fullmatch(regex, t) for t in finished[0])
    assert set(finished[1]) <= set(choices) and finished[1]
    assert all(re.fullmatch(r"\([0-9]+(,[0-9]+)*\)", t) for t in finished[2])
    assert all(isinstance(json.loads(t), dict) for t in finished[3])


def test_constrained_and_free_requests_share_a_batch(llm):
    """Free greedy requests give the same tokens beside constrained ones as alone: masks stay on their rows."""
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(PROMPTS, free, use_tqdm=False)
    paired = [p for p in PROMPTS for _ in range(2)]  # each prompt free, then constrained
    mixed = llm.generate(paired, [free, _json(temperature=1.0, seed=5)] * len(PROMPTS), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[0::2]] == [o.outputs[0].token_ids for o in alone]
    _assert_valid(_completions(mixed[1::2]), NESTED)


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["overlapped", "plain"])
def test_preemption_and_chunked_prefill_keep_the_grammar(tiny_qwen3_dir, async_scheduling):
    """A pool too small for the batch: requests are preempted and recomputed, and their matchers go on."""
    with LLM(str(tiny_qwen3_dir), in_process=True, num_kv_blocks=24, block_size=8, max_num_batched_tokens=16,
             async_scheduling=async_scheduling) as engine:
        outputs = engine.generate(PROMPTS * 3, _json(temperature=1.0, seed=11, max_tokens=120), use_tqdm=False)
        assert engine.last_stats.num_preemptions > 0
    assert _assert_valid(_completions(outputs), NESTED) < 6


def test_streamed_output_validates(tiny_qwen3_dir):
    async def main():
        engine = AsyncLLM(str(tiny_qwen3_dir), num_kv_blocks=256)
        try:
            last, seen = None, 0
            async for out in engine.generate("stream me", _json(temperature=1.0, seed=3), "s1"):
                last, seen = out, seen + 1
            return last, seen
        finally:
            engine.shutdown()

    last, seen = asyncio.run(main())
    assert seen > 5 and last.finished
    _assert_valid(last.outputs, NESTED)


@pytest.mark.parametrize("spec, words", [
    (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "nope"}}}), "nope"),
    (StructuredOutputsParams(json="{not json"), "structured_outputs"),
    (StructuredOutputsParams(json={"type": "string", "pattern": "(("}), "regex"),
    (StructuredOutputsParams(regex="(("), "regex"),
    (StructuredOutputsParams(grammar="start: missing_rule"), "missing_rule"),
], ids=["bad-type", "not-json", "bad-pattern", "bad-regex", "bad-lark"])
def test_a_grammar_that_cannot_compile_is_refused_and_the_engine_goes_on(llm, spec, words):
    with pytest.raises(InvalidRequestError, match=re.escape(words)) as err:
        llm.generate("hi", SamplingParams(structured_outputs=spec), use_tqdm=False)
    assert err.value.param == "structured_outputs"
    [out] = llm.generate("hi", _json(temperature=0.0), use_tqdm=False)
    _assert_valid(out.outputs, NESTED)


@pytest.mark.parametrize("kwargs", [{}, {"json": {}, "regex": "a"}, {"choice": []}, {"regex": ""},
                                    {"json": 3}, {"choice": ["a", 1]}])
def test_params_need_exactly_one_well_formed_kind(kwargs):
    with pytest.raises(InvalidRequestError) as err:
        StructuredOutputsParams(**kwargs)
    assert err.value.param == "structured_outputs"


def test_params_from_a_dict_name_unknown_fields():
    with pytest.raises(InvalidRequestError, match="schema") as err:
        SamplingParams(structured_outputs={"schema": {}})
    assert err.value.param == "structured_outputs"
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs.regex == "a+"


def test_each_grammar_is_compiled_once_and_matchers_are_independent(llm, monkeypatch):
    from engine import structured_output

    compiled = []
    real = structured_output.grammar_of
    monkeypatch.setattr(structured_output, "grammar_of", lambda spec: compiled.append(spec) or real(spec))
    cache = GrammarCache(llm.processor.grammars.tokenizer)
    a = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}}
    b = {"properties": {"y": {"type": "string"}, "x": {"type": "integer"}}, "type": "object"}  # same, reordered
    first = cache.matcher(StructuredOutputsParams(json=a))
    second = cache.matcher(StructuredOutputsParams(json=json.dumps(b)))
    assert len(compiled) == 1
    assert spec_key(StructuredOutputsParams(json=a)) == spec_key(StructuredOutputsParams(json=b))
    assert first is not second
    brace = llm.tokenizer.encode("{", add_special_tokens=False)
    assert first.consume_tokens(brace)
    assert second.validate_tokens(brace) == len(brace)  # still at the start: the first one's token is its own
    assert not second.is_stopped() and not first.is_error()
