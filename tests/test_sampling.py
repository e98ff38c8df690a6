"""Sampling through the whole engine (seeds, top-k/top-p/min-p, stop strings and tokens, min/max tokens,
ignore_eos, logit bias, penalties, n) against independent references, the sampler helpers on small logits, and
SamplingParams validation."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from engine import LLM, SamplingParams
from tests.checkpoints import hf_model

pytestmark = pytest.mark.usefixtures("deadline")

EOS = 0
TEXT = "the the the the the"  # its greedy continuation has no special tokens and varied token texts
MAX = 24


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    engine = LLM(str(tiny_llama_dir), in_process=True, num_kv_blocks=1024, block_size=16)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tok(llm):
    return llm.tokenizer


@pytest.fixture(scope="module")
def greedy_run(llm):
    """(prompt ids, greedy token ids, greedy text) of TEXT."""
    [out] = llm.generate(TEXT, SamplingParams(temperature=0, ignore_eos=True, max_tokens=MAX), use_tqdm=False)
    ids = out.outputs[0].token_ids
    assert len(ids) == MAX and not set(ids) & {0, 1, 2, 3}, "pick another TEXT: the output has special tokens"
    return out.prompt_token_ids, ids, out.outputs[0].text


def _one(llm, prompt, **kw):
    [out] = llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)
    return out.outputs[0]


def _hf_logits(model_dir, ids: list[int]) -> torch.Tensor:
    model = hf_model(model_dir)
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float()


def _reference_decode(model_dir, prompt: list[int], steps: int, process=None, stop_ids=()) -> list[int]:
    """Greedy decoding from HF logits, with `process(logits, output so far)` applied before each argmax."""
    out: list[int] = []
    for _ in range(steps):
        logits = _hf_logits(model_dir, prompt + out).clone()
        if process is not None:
            logits = process(logits, out)
        token = int(logits.argmax())
        out.append(token)
        if token in stop_ids:
            break
    return out


# ---------------------------------------------------------------------------------------------- seeds

def test_seed_gives_the_same_tokens_whatever_the_batch(llm, tiny_llama_dir):
    prompt = "Once upon a time"
    seeded = SamplingParams(temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    alone = _one(llm, prompt, temperature=1.0, seed=42, max_tokens=16, ignore_eos=True).token_ids

    rng = random.Random(7)
    others = ["Hello, how are you", "What is two plus two", "The weather is nice", "def main():",
              "A journey of a thousand miles", "We are going to the market", "café naïve"]
    prompts = others[:3] + [prompt] + others[3:]
    params = [SamplingParams(temperature=rng.uniform(0.3, 1.5), max_tokens=rng.randint(3, 20), ignore_eos=True)
              for _ in others]
    params.insert(3, seeded)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert outputs[3].outputs[0].token_ids == alone

    # The same in another engine whose steps look nothing alike (chunked prefill, other batch order).
    with LLM(str(tiny_llama_dir), in_process=True, num_kv_blocks=256, max_num_batched_tokens=8) as other:
        outputs = other.generate(prompts[::-1], params[::-1], use_tqdm=False)
    assert outputs[-4].outputs[0].token_ids == alone


def test_different_seeds_differ(llm):
    outs = [tuple(_one(llm, "Once upon a time", temperature=1.0, seed=s, max_tokens=16, ignore_eos=True).token_ids)
            for s in range(6)]
    assert len(set(outs)) >= 4, outs
    again = _one(llm, "Once upon a time", temperature=1.0, seed=3, max_tokens=16, ignore_eos=True).token_ids
    assert tuple(again) == outs[3]


def test_sampling_filters_that_keep_one_token_equal_greedy(llm, greedy_run):
    _, greedy, _ = greedy_run
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        out = _one(llm, TEXT, temperature=1.0, seed=0, max_tokens=MAX, ignore_eos=True, **kw)
        assert out.token_ids == greedy, kw


# The first-token distribution, sampled 1000 times, against HF's softmax with the same transformation.
DIST_PROMPT = "the the the the the"


def _empirical(llm, prompt, n=1000, **kw) -> Counter:
    params = [SamplingParams(seed=i, max_tokens=1, ignore_eos=True, **kw) for i in range(n)]
    return Counter(o.outputs[0].token_ids[0] for o in llm.generate([prompt] * n, params, use_tqdm=False))


def _chi2(counts: Counter, probs: torch.Tensor, bins: int = 8) -> float:
    """Pearson's statistic over the `bins` most likely tokens and the rest (bins of zero probability left out:
    the support check covers them)."""
    n = sum(counts.values())
    top = probs.topk(bins).indices.tolist()
    observed = [counts.get(t, 0) for t in top] + [n - sum(counts.get(t, 0) for t in top)]
    expected = [n * probs[t].item() for t in top] + [n * (1 - sum(probs[t].item() for t in top))]
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 1e-6)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.0),
                                dict(temperature=1.0, top_k=3), dict(temperature=1.0, top_p=0.3),
                                dict(temperature=0.7, min_p=0.05)], ids=str)
def test_sampled_distribution_matches_the_model(llm, tiny_llama_dir, kw):
    ids = llm.tokenizer.encode(DIST_PROMPT)
    raw = _hf_logits(tiny_llama_dir, ids)
    logits = raw / kw["temperature"]
    probs = torch.softmax(logits, -1)
    if "top_k" in kw:
        kth = logits.topk(kw["top_k"]).values[-1]
        probs = torch.softmax(logits.masked_fill(logits < kth, -math.inf), -1)
    if "top_p" in kw:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < kw["top_p"]
        probs = torch.zeros_like(probs).index_fill(0, order[keep], 1.0) * probs
        probs /= probs.sum()
    if "min_p" in kw:
        probs = torch.where(probs >= kw["min_p"] * probs.max(), probs, 0.0)
        probs /= probs.sum()
    support = set(torch.nonzero(probs).flatten().tolist())
    assert len(support) > 1
    counts = _empirical(llm, DIST_PROMPT, **kw)
    assert set(counts) <= support, "sampled a token the filters remove"
    assert _chi2(counts, probs) < 35, (counts.most_common(5), probs.topk(5))  # p < 1e-4 for 8 dof
    # ... and the statistic can tell: against the plain softmax (temperature 1, no filter) it is far off.
    if kw != dict(temperature=1.0):
        assert _chi2(counts, torch.softmax(raw, -1)) > 100


# ---------------------------------------------------------------------------------------------- stop strings

def _token_spans(tok, ids) -> list[tuple[int, int]]:
    """(start, end) of each token's text inside decode(ids), from decoding growing prefixes."""
    spans, prev = [], 0
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        spans.append((prev, len(text)))
        prev = len(text)
    return spans


def _straddling_stop(tok, ids) -> tuple[str, int, int]:
    """A 4-character stop string made of the last 2 characters of token k-1 and the first 2 of token k, whose
    first occurrence in the text is there; returns (stop, its start, k)."""
    full = tok.decode(ids)
    spans = _token_spans(tok, ids)
    for k in range(2, len(ids) - 2):
        (a0, a1), (b0, b1) = spans[k - 1], spans[k]
        left, right = tok.decode([ids[k - 1]]), tok.decode([ids[k]])
        if a1 - a0 < 2 or b1 - b0 < 2 or a1 != b0 or "\ufffd" in left + right:
            continue
        if full[a0:a1] != left or full[b0:b1] != right:
            continue
        stop = full[a1 - 2 : a1 + 2]
        if full.find(stop) == a1 - 2 and stop not in left and stop not in right and stop.strip() == stop:
            return stop, a1 - 2, k
    pytest.fail(f"no token boundary to put a stop string across in {full!r}")


@pytest.mark.parametrize("include", [False, True], ids=["exclude", "include"])
def test_stop_string_across_token_boundary(llm, tok, greedy_run, include):
    _, ids, full = greedy_run
    assert full == tok.decode(ids)
    stop, start, k = _straddling_stop(tok, ids)
    # It does straddle: neither token's text holds it, their concatenation does.
    assert stop in tok.decode(ids[k - 1 : k + 1]) and stop not in tok.decode([ids[k]])
    out = _one(llm, TEXT, temperature=0, ignore_eos=True, max_tokens=MAX, stop=[stop],
               include_stop_str_in_output=include)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == (full[: start + len(stop)] if include else full[:start])
    assert out.token_ids == ids[: k + 1]  # generation ended with the token that completed the stop string


def test_earliest_stop_string_wins(llm, tok, greedy_run):
    _, _, full = greedy_run
    late = full[-3:]
    early = full[4:7]
    assert full.find(early) < full.find(late)
    out = _one(llm, TEXT, temperature=0, ignore_eos=True, max_tokens=MAX, stop=[late, early])
    assert out.stop_reason == early and out.text == full[: full.find(early)]


def test_stop_string_waits_for_min_tokens(llm, tok, greedy_run):
    """As vLLM: a stop string completed before min_tokens tokens are out does not stop the request."""
    _, ids, full = greedy_run
    stop, start, k = _straddling_stop(tok, ids)
    assert full.find(stop, start + 1) < 0  # it occurs once, completed by token k
    out = _one(llm, TEXT, temperature=0, ignore_eos=True, max_tokens=MAX, stop=[stop], min_tokens=k + 2)
    assert out.finish_reason == "length" and out.text == full


def test_stop_string_not_in_output_runs_to_length(llm, greedy_run):
    """A stop string that the text only starts (its tail is held back while it might complete) or that only
    the prompt contains: nothing stops, and the final text is all of it."""
    _, ids, full = greedy_run
    for stop in (full[-2:] + "\x00zz", TEXT[-5:]):
        assert stop not in full
        out = _one(llm, TEXT, temperature=0, ignore_eos=True, max_tokens=MAX, stop=stop)
        assert out.finish_reason == "length" and out.stop_reason is None
        assert out.text == full and out.token_ids == ids


# ---------------------------------------------------------------------------------------------- stop tokens

def _fresh_index(ids, start=2) -> int:
    return next(j for j in range(start, len(ids)) if ids[j] not in ids[:j])


@pytest.mark.parametrize("include", [False, True], ids=["exclude", "include"])
def test_stop_token_ids(llm, tok, greedy_run, include):
    _, ids, _ = greedy_run
    j = _fresh_index(ids)
    out = _one(llm, TEXT, temperature=0, ignore_eos=True, max_tokens=MAX, stop_token_ids=[ids[j], 3],
               include_stop_str_in_output=include)
    assert out.token_ids == ids[: j + 1]
    assert out.finish_reason == "stop" and out.stop_reason == ids[j]
    assert out.text == tok.decode(ids[: j + 1] if include else ids[:j])


def test_min_tokens_defers_stop_tokens(llm, tiny_llama_dir, greedy_run):
    prompt, ids, _ = greedy_run
    j = _fresh_index(ids)
    stop, min_tokens = ids[j], j + 3

    def mask(logits, out):
        if len(out) < min_tokens:
            logits[stop] = -math.inf
        return logits

    expected = _reference_decode(tiny_llama_dir, prompt, MAX, mask, stop_ids={stop})
    out = _one(llm, TEXT, temperature=0, ignore_eos=True, max_tokens=MAX, stop_token_ids=[stop],
               min_tokens=min_tokens)
    assert out.token_ids == expected
    assert stop not in out.token_ids[:min_tokens]
    assert len(out.token_ids) > j + 1
    if expected[-1] == stop and len(expected) < MAX:
        assert out.finish_reason == "stop" and out.stop_reason == stop
    else:
        assert out.finish_reason == "length"


def test_min_tokens_defers_eos(llm):
    out = _one(llm, TEXT, temperature=0, max_tokens=10, min_tokens=4, logit_bias={EOS: 100})
    assert EOS not in out.token_ids[:4]
    assert out.token_ids[4:] == [EOS] and out.finish_reason == "stop"


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_max_tokens(llm, greedy_run, max_tokens):
    _, ids, _ = greedy_run
    out = _one(llm, TEXT, temperature=0, ignore_eos=True, max_tokens=max_tokens)
    assert out.token_ids == ids[:max_tokens]
    assert out.finish_reason == "length" and out.stop_reason is None


def test_ignore_eos(llm):
    forced = dict(temperature=0, max_tokens=6, logit_bias={EOS: 100})
    stopped = _one(llm, TEXT, **forced)
    assert stopped.token_ids == [EOS] and stopped.finish_reason == "stop" and stopped.text == ""
    running = _one(llm, TEXT, ignore_eos=True, **forced)
    assert running.token_ids == [EOS] * 6 and running.finish_reason == "length"
    # sampled rows too
    sampled = _one(llm, TEXT, temperature=1.0, seed=1, max_tokens=6, logit_bias={EOS: 100}, ignore_eos=True)
    assert sampled.token_ids == [EOS] * 6


def test_logit_bias(llm, greedy_run):
    _, ids, _ = greedy_run
    for temperature in (0, 1.0):
        out = _one(llm, TEXT, temperature=temperature, seed=5, ignore_eos=True, max_tokens=8, logit_bias={"321": 100})
        assert out.token_ids == [321] * 8
    banned = _one(llm, TEXT, temperature=0, ignore_eos=True, max_tokens=MAX, logit_bias={ids[0]: -100})
    assert banned.token_ids[0] != ids[0] and ids[0] not in banned.token_ids


# ---------------------------------------------------------------------------------------------- penalties

def _vllm_penalties(prompt, rep=1.0, presence=0.0, frequency=0.0):
    """vLLM's formulas: repetition over prompt and output tokens (divide positive logits, multiply negative
    ones), then frequency and presence over output tokens."""
    def process(logits, out):
        seen = set(prompt) | set(out)
        for t in seen:
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t, c in Counter(out).items():
            logits[t] -= frequency * c + presence
        return logits
    return process


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.8), dict(repetition_penalty=0.5),
                                dict(presence_penalty=2.0), dict(frequency_penalty=1.5),
                                dict(presence_penalty=-1.0, frequency_penalty=0.7, repetition_penalty=1.3)], ids=str)
def test_penalties_match_vllm_formulas(llm, tiny_llama_dir, kw):
    prompt_text = "Once upon a time there was"  # greedy repeats a token six times
    prompt = llm.tokenizer.encode(prompt_text)
    plain = _one(llm, prompt_text, temperature=0, ignore_eos=True, max_tokens=MAX).token_ids
    rep, presence, frequency = kw.get("repetition_penalty", 1.0), kw.get("presence_penalty", 0.0), \
        kw.get("frequency_penalty", 0.0)
    expected = _reference_decode(tiny_llama_dir, prompt, MAX, _vllm_penalties(prompt, rep, presence, frequency))
    out = _one(llm, prompt_text, temperature=0, ignore_eos=True, max_tokens=MAX, **kw)
    assert out.token_ids == expected
    assert out.token_ids != plain, "the penalty changed nothing: the test checks nothing"


# ---------------------------------------------------------------------------------------------- n

def test_n_completions(llm, tok):
    sp = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    [out] = llm.generate(TEXT, sp, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # a completion cut by max_tokens inside a multi-byte character ends before that character
    assert all(c.text == tok.decode(c.token_ids).rstrip("\ufffd") for c in out.outputs)
    [again] = llm.generate(TEXT, sp, use_tqdm=False)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]

    [greedy] = llm.generate(TEXT, SamplingParams(n=2, temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_n_with_stop_ends_each_completion_on_its_own(llm):
    sp = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, logprobs=1)
    [free] = llm.generate(TEXT, sp, use_tqdm=False)
    stop_token = free.outputs[1].token_ids[2]
    sp = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, logprobs=1,
                        stop_token_ids=[stop_token])
    [stopped] = llm.generate(TEXT, sp, use_tqdm=False)
    for a, b in zip(free.outputs, stopped.outputs):
        cut = a.token_ids.index(stop_token) + 1 if stop_token in a.token_ids else len(a.token_ids)
        assert b.token_ids == a.token_ids[:cut]
        assert len(b.logprobs) == len(b.token_ids)
        assert b.finish_reason == ("stop" if stop_token in a.token_ids else "length")
    assert stopped.finished


def test_overlapped_steps_match_synchronous_steps(llm, tiny_llama_dir, greedy_run):
    """async_scheduling (on in `llm`) against synchronous steps, on one batch mixing greedy rows, a stop token,
    min_tokens, seeded sampling with logprobs, and a short penalised request (steps wait while it runs)."""
    _, ids, _ = greedy_run
    j = _fresh_index(ids)
    params = [
        SamplingParams(temperature=0, ignore_eos=True, max_tokens=MAX, stop_token_ids=[ids[j]]),
        SamplingParams(temperature=0, ignore_eos=True, max_tokens=MAX, stop_token_ids=[ids[j]], min_tokens=j + 2),
        SamplingParams(temperature=0.9, seed=3, ignore_eos=True, max_tokens=MAX, logprobs=2),
        SamplingParams(temperature=0, ignore_eos=True, max_tokens=5),
        SamplingParams(temperature=0.9, seed=4, ignore_eos=True, max_tokens=4, frequency_penalty=1.5),
    ]
    prompts = [TEXT, TEXT, "the cat", TEXT, "a b c"]
    with LLM(str(tiny_llama_dir), in_process=True, num_kv_blocks=1024, block_size=16,
             async_scheduling=False) as sync:
        expected = sync.generate(prompts, params, use_tqdm=False)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in got] == [j + 1, len(got[1].outputs[0].token_ids), MAX, 5, 4]
    for e, g in zip(expected, got):
        e, g = e.outputs[0], g.outputs[0]
        assert (g.token_ids, g.finish_reason, g.stop_reason) == (e.token_ids, e.finish_reason, e.stop_reason)
        assert g.logprobs == e.logprobs
