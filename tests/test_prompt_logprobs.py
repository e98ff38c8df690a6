"""Prompt logprobs (SamplingParams.prompt_logprobs) equal log_softmax of the Hugging Face logits at every prompt
position — value, rank, top-k alternatives, decoded text — whole or prefilled in chunks, after preemption (each
position once), with the prefix cache on (those requests take no cached blocks), and with max_tokens=0 (the
prompt alone, no token sampled)."""

from __future__ import annotations

import asyncio
import random

import pytest

from engine import LLM, AsyncLLM, SamplingParams
from engine.errors import InvalidRequestError
from tests.checkpoints import hf_greedy, hf_logprobs

pytestmark = pytest.mark.usefixtures("deadline")

BLOCK = 8
TOL = 1e-4


def _prompts() -> list[list[int]]:
    rng = random.Random(17)
    shared = [rng.randrange(4, 512) for _ in range(24)]
    lengths = (1, 2, 9, 16, 45, 70)
    return [[rng.randrange(4, 512) for _ in range(n)] for n in lengths] + [shared + [5, 6, 7], shared + [8] * 12]


PROMPTS = _prompts()


def check_prompt_logprobs(model_dir, tokenizer, prompt: list[int], got, top: int) -> None:
    """got: RequestOutput.prompt_logprobs, compared position by position with HF's log_softmax."""
    assert got is not None and len(got) == len(prompt) and got[0] is None
    ref = hf_logprobs(model_dir, prompt)
    for i in range(1, len(prompt)):
        row, token, entry = ref[i - 1], prompt[i], got[i]
        assert next(iter(entry)) == token, f"position {i}: the prompt token comes first"
        actual = entry[token]
        assert actual.logprob == pytest.approx(row[token].item(), abs=TOL), f"position {i}"
        ranked = {t: lp for t, lp in entry.items() if lp.rank <= top}
        assert sorted(lp.rank for lp in ranked.values()) == list(range(1, top + 1)), f"position {i}: {entry}"
        if top:
            ref_top = row.topk(top)
            for t in set(ranked) ^ set(ref_top.indices.tolist()):  # the same top set, ties at the k-th value aside
                assert abs(row[t].item() - ref_top.values[-1].item()) < 1e-5, f"position {i}: top sets differ at {t}"
        assert len(entry) == top + (0 if actual.rank <= top else 1)
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(row[t].item(), abs=TOL), f"position {i}: id {t}"
            assert int((row > row[t] + 1e-5).sum()) + 1 <= lp.rank <= int((row > row[t] - 1e-5).sum()), \
                f"position {i}: rank {lp.rank} of id {t}"
            assert lp.decoded_token == tokenizer.decode([t])


def test_prompt_logprobs_match_hf(tiny_model_dir, tiny_tokenizer):
    """Every architecture, the whole prompt in one step, beside a request without prompt logprobs."""
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=4, prompt_logprobs=5)
    with LLM(str(tiny_model_dir), in_process=True, num_kv_blocks=256, block_size=BLOCK) as engine:
        outputs = engine.generate(PROMPTS + [PROMPTS[4]], [sp] * len(PROMPTS) + [SamplingParams(
            temperature=0, ignore_eos=True, max_tokens=4)], use_tqdm=False)
    reference = hf_greedy(tiny_model_dir, PROMPTS, 4)
    for prompt, out, ref in zip(PROMPTS, outputs, reference):
        check_prompt_logprobs(tiny_model_dir, tiny_tokenizer, prompt, out.prompt_logprobs, 5)
        assert out.outputs[0].token_ids == ref  # sampling is untouched
        assert out.outputs[0].logprobs is None
    assert outputs[-1].prompt_logprobs is None and outputs[-1].outputs[0].token_ids == reference[4]


@pytest.mark.parametrize("budget", [5, 16])
def test_chunked_prefill(tiny_llama_dir, tiny_tokenizer, budget):
    """Prompts longer than max_num_batched_tokens: each chunk predicts the next chunk's first token."""
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=3, prompt_logprobs=2, logprobs=1)
    with LLM(str(tiny_llama_dir), in_process=True, num_kv_blocks=256, block_size=BLOCK,
             max_num_batched_tokens=budget) as engine:
        outputs = engine.generate(PROMPTS, sp, use_tqdm=False)
    for prompt, out, ref in zip(PROMPTS, outputs, hf_greedy(tiny_llama_dir, PROMPTS, 3)):
        check_prompt_logprobs(tiny_llama_dir, tiny_tokenizer, prompt, out.prompt_logprobs, 2)
        assert out.outputs[0].token_ids == ref


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["overlapped", "plain"])
def test_preemption_reports_each_position_once(tiny_llama_dir, tiny_tokenizer, async_scheduling):
    """A pool that holds the largest request alone: requests are preempted mid-prompt and mid-output and
    recomputed; their prompt logprobs still come once per position, exact."""
    largest = max(len(p) for p in PROMPTS) + 10
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=10, prompt_logprobs=3)
    with LLM(str(tiny_llama_dir), in_process=True, num_kv_blocks=-(-largest // BLOCK), block_size=BLOCK,
             max_num_batched_tokens=16, async_scheduling=async_scheduling) as engine:
        outputs = engine.generate(PROMPTS, sp, use_tqdm=False)
        assert engine.last_stats.num_preemptions > 0
    for prompt, out, ref in zip(PROMPTS, outputs, hf_greedy(tiny_llama_dir, PROMPTS, 10)):
        check_prompt_logprobs(tiny_llama_dir, tiny_tokenizer, prompt, out.prompt_logprobs, 3)
        assert out.outputs[0].token_ids == ref


def test_prefix_cache_on(tiny_llama_dir, tiny_tokenizer):
    """A request that wants prompt logprobs takes no block from the prefix cache (it needs every position's
    logits); the blocks it computes serve later requests that don't."""
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=2, prompt_logprobs=1)
    plain = SamplingParams(temperature=0, ignore_eos=True, max_tokens=2)
    prompt = PROMPTS[5]
    with LLM(str(tiny_llama_dir), in_process=True, num_kv_blocks=256, block_size=BLOCK) as engine:
        first = engine.generate([prompt], sp, use_tqdm=False)[0]
        again = engine.generate([prompt], sp, use_tqdm=False)[0]
        reused = engine.generate([prompt], plain, use_tqdm=False)[0]
    assert first.num_cached_tokens == again.num_cached_tokens == 0
    assert reused.num_cached_tokens == (len(prompt) - 1) // BLOCK * BLOCK
    for out in (first, again):
        check_prompt_logprobs(tiny_llama_dir, tiny_tokenizer, prompt, out.prompt_logprobs, 1)
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == reused.outputs[0].token_ids


@pytest.mark.parametrize("budget", [8192, 7])
def test_max_tokens_zero(tiny_llama_dir, tiny_tokenizer, budget):
    """The prompt's logprobs alone: finish_reason "length", no token, no text — n > 1 too."""
    sp = SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=4, n=2, logprobs=2)
    with LLM(str(tiny_llama_dir), in_process=True, num_kv_blocks=256, block_size=BLOCK,
             max_num_batched_tokens=budget) as engine:
        outputs = engine.generate(PROMPTS, sp, use_tqdm=False)
        assert engine.last_stats.num_running == engine.last_stats.num_waiting == 0
        assert engine.last_stats.kv_cache_usage == 0.0
    for prompt, out in zip(PROMPTS, outputs):
        assert out.finished and len(out.outputs) == 2
        for c in out.outputs:
            assert (c.finish_reason, c.token_ids, c.text, c.logprobs) == ("length", [], "", [])
        check_prompt_logprobs(tiny_llama_dir, tiny_tokenizer, prompt, out.prompt_logprobs, 4)
    assert outputs[0].prompt_logprobs == [None]  # one token: nothing predicts it


def test_bad_values_are_refused_by_name():
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(prompt_logprobs=21)
    assert exc.value.param == "prompt_logprobs"
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(prompt_logprobs=-1)
    assert exc.value.param == "prompt_logprobs"
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(max_tokens=0)
    assert exc.value.param == "max_tokens"


def test_streamed_deltas_carry_them_once(tiny_llama_dir, tiny_tokenizer):
    """AsyncLLM with delta=True: the first output whose prompt logprobs are complete carries them, no other;
    no token is streamed before them. Cumulative outputs carry them from then on."""
    prompt = PROMPTS[5]
    sp = SamplingParams(temperature=0, ignore_eos=True, max_tokens=5, prompt_logprobs=2, n=2)

    async def main():
        engine = AsyncLLM(str(tiny_llama_dir), in_process=True, num_kv_blocks=64, block_size=BLOCK,
                          max_num_batched_tokens=16)
        try:
            deltas = [o async for o in engine.generate(prompt, sp, delta=True)]
            cumulative = [o async for o in engine.generate(prompt, sp)]
        finally:
            engine.shutdown()
        return deltas, cumulative

    deltas, cumulative = asyncio.run(main())
    carrying = [i for i, o in enumerate(deltas) if o.prompt_logprobs is not None]
    assert len(carrying) == 1
    assert not any(c.token_ids for o in deltas[: carrying[0]] for c in o.outputs)
    check_prompt_logprobs(tiny_llama_dir, tiny_tokenizer, prompt, deltas[carrying[0]].prompt_logprobs, 2)
    assert cumulative[-1].prompt_logprobs == deltas[carrying[0]].prompt_logprobs
    first = next(i for i, o in enumerate(cumulative) if o.prompt_logprobs is not None)
    assert all(o.prompt_logprobs is not None for o in cumulative[first:])


def test_scheduler_max_tokens_zero_samples_nothing():
    """The scheduler alone: a max_tokens=0 request's rows never sample, it ends once its prompt is computed
    (also when the step that computed it is still in flight), and it takes no cached prefix while it owes
    prompt logprobs."""
    from engine.block_manager import BlockManager
    from engine.scheduler import Scheduler
    from engine.sequence import Sequence

    sched = Scheduler(BlockManager(32, 4), 8, 6, 256)
    warm = Sequence("warm", list(range(10)), SamplingParams(max_tokens=1))
    sched.add(warm)
    for _ in range(2):
        out = sched.schedule()
        sched.update(out, [7 if r.sample else None for r in out.rows])
    assert warm.is_finished
    seq = Sequence("zero", list(range(10)), SamplingParams(max_tokens=0, prompt_logprobs=1))
    sched.add(seq)
    first = sched.schedule()  # 6 of 10 tokens: none from the cache, though 8 are there
    assert [(r.start, r.num_tokens, r.sample) for r in first.rows] == [(0, 6, False)]
    second = sched.schedule()  # launched before the first step's update (overlapped)
    assert [(r.start, r.num_tokens, r.sample, r.prompt_logprobs_from) for r in second.rows] == [(6, 4, False, 6)]
    assert not sched.schedule()  # nothing left to compute, nothing pending
    assert [s for _, s in sched.update(first, [None])] == [seq] and not seq.is_finished
    assert [s for _, s in sched.update(second, [None])] == [seq] and seq.finish_reason == "length"
    assert seq.token_ids == list(range(10)) and not sched.has_work()
    sched.check_integrity()
