"""The engine's correctness contract: greedy output equals Hugging Face `generate(do_sample=False)` token for
token on every architecture — plain, with chunked prefill forced, with prefix-cache hits, with preemption forced —
and logprobs equal HF's log_softmax (chosen token, top-k alternatives, ranks)."""

from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams
from tests.checkpoints import hf_greedy, hf_logprobs

pytestmark = pytest.mark.usefixtures("deadline")

MAX_TOKENS = 10
BLOCK = 8
SHARED = 32  # tokens of the prefix several prompts share (4 blocks of 8)


def _make_prompts() -> list[list[int]]:
    """Prompts of varied lengths (1..70, block multiples and not), several sharing a 32-token prefix."""
    rng = random.Random(1234)
    def ids(n: int) -> list[int]:
        return [rng.randrange(4, 512) for _ in range(n)]  # no special tokens

    shared = ids(SHARED)
    prompts = [ids(n) for n in (1, 2, 7, 8, 9, 16, 17, 45)]
    prompts += [shared + ids(n) for n in (1, 8, 24, 38)]  # lengths 33, 40, 56, 70
    return prompts


PROMPTS = _make_prompts()
SHARED_PREFIX = PROMPTS[-1][:SHARED]
GREEDY = SamplingParams(temperature=0, ignore_eos=True, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> list[list[int]]:
    """HF greedy tokens of PROMPTS for this architecture."""
    return hf_greedy(tiny_model_dir, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    """One engine per architecture with the default scheduler settings (only the KV pool is given explicitly:
    the CPU default of 2 GiB takes seconds to zero)."""
    engine = LLM(str(tiny_model_dir), in_process=True, num_kv_blocks=256)
    yield engine
    engine.shutdown()


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _assert_equal_to_hf(outputs, reference) -> None:
    assert len(outputs) == len(reference)
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        assert out.finished
        completion = out.outputs[0]
        assert completion.token_ids == ref, f"prompt {i} (length {len(PROMPTS[i])}) diverges from HF"
        assert completion.finish_reason == "length"
        assert out.prompt_token_ids == PROMPTS[i]


def test_greedy_matches_hf(llm, reference):
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    _assert_equal_to_hf(outputs, reference)
    stats = llm.last_stats
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def test_greedy_one_prompt_at_a_time_matches_batch(llm, reference):
    """Batching changes nothing: each prompt alone gives the same tokens as in the batch."""
    for prompt, ref in zip(PROMPTS[::3], reference[::3]):
        [out] = llm.generate([prompt], GREEDY, use_tqdm=False)
        assert out.outputs[0].token_ids == ref


@pytest.mark.parametrize("budget", [5, 16])
def test_chunked_prefill_matches_hf(tiny_model_dir, reference, budget):
    """max_num_batched_tokens below most prompt lengths: prompts are prefilled over several steps, mixed with
    other requests' decodes, with chunk boundaries inside blocks (5) and on them (16)."""
    with LLM(str(tiny_model_dir), in_process=True, num_kv_blocks=256, block_size=BLOCK,
             max_num_batched_tokens=budget, enable_prefix_caching=False) as engine:
        outputs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    _assert_equal_to_hf(outputs, reference)


def test_prefix_cache_hits_match_hf(tiny_model_dir, reference):
    with LLM(str(tiny_model_dir), in_process=True, num_kv_blocks=256, block_size=BLOCK) as engine:
        first = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
        _assert_equal_to_hf(first, reference)
        # All prompts were scheduled in the same step: none could find another's blocks yet.
        assert [o.num_cached_tokens for o in first] == [0] * len(PROMPTS)
        hits_before = engine.last_stats.prefix_cache_hits

        # The same prompts again: every full block but the one holding the last prompt token is reused
        # (prompts that computed the shared prefix in the same step share one copy of it).
        second = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
        _assert_equal_to_hf(second, reference)
        cached = [o.num_cached_tokens for o in second]
        cacheable = [(len(p) - 1) // BLOCK * BLOCK for p in PROMPTS]
        assert cached == cacheable
        assert engine.last_stats.prefix_cache_hits - hits_before == sum(cached) > 0

        # New prompts that share only the 32-token prefix: its 4 blocks are hit, then computation resumes
        # mid-prompt.
        rng = random.Random(99)
        fresh = [SHARED_PREFIX + [rng.randrange(4, 512) for _ in range(n)] for n in (1, 5, 9, 30)]
        fresh_ref = hf_greedy(tiny_model_dir, fresh, MAX_TOKENS)
        third = engine.generate(fresh, GREEDY, use_tqdm=False)
        assert _tokens(third) == fresh_ref
        assert [o.num_cached_tokens for o in third] == [SHARED] * len(fresh)


def test_prefix_cache_after_a_prefix_computed_twice(tiny_model_dir, reference):
    """Two prompts sharing a 32-token prefix run in the same step, so both compute its 4 blocks; the longer
    one's further blocks must still be found afterwards (they descend from its own copy of the prefix, while
    the cache serves the other copy)."""
    short, long = PROMPTS[8], PROMPTS[10]  # 32 + 1 and 32 + 24 tokens
    with LLM(str(tiny_model_dir), in_process=True, num_kv_blocks=256, block_size=BLOCK) as engine:
        engine.generate([short, long], GREEDY, use_tqdm=False)
        again = engine.generate([long], GREEDY, use_tqdm=False)
    assert again[0].outputs[0].token_ids == reference[10]
    assert again[0].num_cached_tokens == (len(long) - 1) // BLOCK * BLOCK  # 48: 6 full blocks


def test_prefix_cache_with_chunked_prefill(tiny_model_dir, reference):
    with LLM(str(tiny_model_dir), in_process=True, num_kv_blocks=256, block_size=BLOCK,
             max_num_batched_tokens=12) as engine:
        first = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
        second = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    _assert_equal_to_hf(first, reference)
    _assert_equal_to_hf(second, reference)
    assert sum(o.num_cached_tokens for o in second) > 0


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_preemption_matches_hf(tiny_model_dir, reference, prefix_caching):
    """A KV pool that holds exactly the largest request (70 + 10 tokens = 10 blocks of 8): running requests
    are preempted and recomputed, and nothing in the output shows it."""
    largest = max(len(p) for p in PROMPTS) + MAX_TOKENS
    num_blocks = -(-largest // BLOCK)
    with LLM(str(tiny_model_dir), in_process=True, num_kv_blocks=num_blocks, block_size=BLOCK,
             enable_prefix_caching=prefix_caching) as engine:
        outputs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
        stats = engine.last_stats
    assert stats.num_preemptions > 0
    _assert_equal_to_hf(outputs, reference)
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


def test_preemption_with_chunked_prefill(tiny_model_dir, reference):
    largest = max(len(p) for p in PROMPTS) + MAX_TOKENS
    with LLM(str(tiny_model_dir), in_process=True, num_kv_blocks=-(-largest // BLOCK) + 2, block_size=BLOCK,
             max_num_batched_tokens=16) as engine:
        outputs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert engine.last_stats.num_preemptions > 0
    _assert_equal_to_hf(outputs, reference)


# ---------------------------------------------------------------------------------------------- logprobs

TOP = 5
TOL = 1e-4


def _check_logprobs(model_dir, tokenizer, prompt: list[int], completion, top: int) -> list[int]:
    """Compare every generated token's logprob dict with HF's log_softmax; returns the chosen tokens' ranks."""
    generated = completion.token_ids
    assert completion.logprobs is not None and len(completion.logprobs) == len(generated)
    ref = hf_logprobs(model_dir, prompt + generated)
    ranks = []
    for k, (token, entry) in enumerate(zip(generated, completion.logprobs)):
        row = ref[len(prompt) - 1 + k]
        assert token in entry, f"token {k}: the chosen token is missing from its logprobs"
        chosen = entry[token]
        assert chosen.logprob == pytest.approx(row[token].item(), abs=TOL), f"token {k}: chosen logprob"
        ranks.append(chosen.rank)

        alternatives = {t: lp for t, lp in entry.items() if lp.rank <= top}
        assert sorted(lp.rank for lp in alternatives.values()) == list(range(1, top + 1)), f"token {k}: {entry}"
        if top:
            ref_top = row.topk(top)
            kth = ref_top.values[-1].item()
            # The same top set, ties at the k-th value aside.
            for t in set(alternatives) ^ set(ref_top.indices.tolist()):
                assert abs(row[t].item() - kth) < 1e-5, f"token {k}: top-{top} sets differ at id {t}"
        assert len(entry) == top + (0 if token in alternatives else 1), f"token {k}: {sorted(entry)}"
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(row[t].item(), abs=TOL), f"token {k}: logprob of id {t}"
            assert int((row > row[t] + 1e-5).sum()) + 1 <= lp.rank <= int((row > row[t] - 1e-5).sum()), \
                f"token {k}: rank {lp.rank} of id {t}"
            assert lp.decoded_token == tokenizer.decode([t])
    return ranks


def test_logprobs_match_hf(llm, tiny_model_dir, tiny_tokenizer, reference):
    prompts = PROMPTS[::2]
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=6, logprobs=TOP)
    outputs = llm.generate(prompts, sp, use_tqdm=False)
    for prompt, out, ref in zip(prompts, outputs, reference[::2]):
        assert out.outputs[0].token_ids == ref[:6]
        ranks = _check_logprobs(tiny_model_dir, tiny_tokenizer, prompt, out.outputs[0], TOP)
        assert ranks == [1] * 6  # greedy picks the most likely token


def test_logprobs_of_sampled_tokens_are_raw(llm, tiny_model_dir, tiny_tokenizer):
    """Sampled at a high temperature: logprobs stay those of the raw model distribution, and the chosen
    token's rank is reported even when it is not the most likely one (or not in the top-k at all)."""
    prompts = PROMPTS[1::2]
    params = [SamplingParams(temperature=1.8, seed=i, ignore_eos=True, max_tokens=6, logprobs=2)
              for i in range(len(prompts))]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    ranks = []
    for prompt, out in zip(prompts, outputs):
        ranks += _check_logprobs(tiny_model_dir, tiny_tokenizer, prompt, out.outputs[0], 2)
    assert max(ranks) > 2, "no sampled token outside the top 2: the test checks nothing new"


def test_logprobs_zero_and_none(llm, tiny_model_dir, tiny_tokenizer, reference):
    none, zero = llm.generate([PROMPTS[4]] * 2, [GREEDY, SamplingParams(temperature=0, ignore_eos=True,
                                                                        max_tokens=MAX_TOKENS, logprobs=0)],
                              use_tqdm=False)
    assert none.outputs[0].logprobs is None
    assert zero.outputs[0].token_ids == none.outputs[0].token_ids == reference[4]
    _check_logprobs(tiny_model_dir, tiny_tokenizer, PROMPTS[4], zero.outputs[0], 0)
    assert all(len(entry) == 1 for entry in zero.outputs[0].logprobs)


def test_logprobs_with_chunked_prefill_and_preemption(tiny_model_dir, tiny_tokenizer, reference):
    largest = max(len(p) for p in PROMPTS) + MAX_TOKENS
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=MAX_TOKENS, logprobs=3)
    with LLM(str(tiny_model_dir), in_process=True, num_kv_blocks=-(-largest // BLOCK), block_size=BLOCK,
             max_num_batched_tokens=16) as engine:
        outputs = engine.generate(PROMPTS, sp, use_tqdm=False)
        assert engine.last_stats.num_preemptions > 0
    _assert_equal_to_hf(outputs, reference)
    for prompt, out in zip(PROMPTS[-4:], outputs[-4:]):
        _check_logprobs(tiny_model_dir, tiny_tokenizer, prompt, out.outputs[0], 3)


# ---------------------------------------------------------------------------------------------- process mode

@pytest.mark.slow
def test_subprocess_engine_matches_hf(tiny_llama_dir):
    """The default mode: the engine core in its own process gives the same tokens and logprobs."""
    reference = hf_greedy(tiny_llama_dir, PROMPTS, MAX_TOKENS)
    # Seeded sampling with every kind of field (extreme seeds, int logit bias, stop lists) crosses the process
    # boundary intact: the same tokens as in process.
    sampled = [SamplingParams(temperature=1.0, seed=seed, n=2, max_tokens=6, ignore_eos=True, logit_bias={5: 1},
                              stop=["zzz"], stop_token_ids=[3], top_k=50, top_p=0.9)
               for seed in (2**64 - 1, -5, 0)]
    with LLM(str(tiny_llama_dir), in_process=True, num_kv_blocks=256) as engine:
        in_process = [[c.token_ids for c in o.outputs]
                      for o in engine.generate(PROMPTS[:3], sampled, use_tqdm=False)]
    with LLM(str(tiny_llama_dir), num_kv_blocks=256, block_size=BLOCK, max_num_batched_tokens=32) as engine:
        assert engine.client.__class__.__name__ == "ProcessClient"
        outputs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
        again = engine.generate(PROMPTS[-4:], SamplingParams(temperature=0, ignore_eos=True,
                                                             max_tokens=MAX_TOKENS, logprobs=2), use_tqdm=False)
        assert [[c.token_ids for c in o.outputs]
                for o in engine.generate(PROMPTS[:3], sampled, use_tqdm=False)] == in_process
    _assert_equal_to_hf(outputs, reference)
    assert _tokens(again) == reference[-4:]
    assert all(o.num_cached_tokens > 0 for o in again)
    ref = hf_logprobs(tiny_llama_dir, PROMPTS[-1] + reference[-1])
    lp = again[-1].outputs[0].logprobs
    for k, token in enumerate(reference[-1]):
        assert lp[k][token].logprob == pytest.approx(ref[len(PROMPTS[-1]) - 1 + k, token].item(), abs=TOL)
