"""Scheduler: token budget, chunked prefill, prefix hits, preemption, finishing, abort (the property test is in
test_scheduler_property.py)."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus

EOS = 99


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, max_model_len=256, caching=True):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    return Scheduler(bm, max_num_seqs, budget, max_model_len)


def make_seq(request_id, prompt, **params) -> Sequence:
    params.setdefault("max_tokens", 16)
    params.setdefault("eos_token_ids", [EOS])
    return Sequence(request_id, list(prompt), SamplingParams(**params))


def step(sched: Scheduler, token=7, tokens: dict | None = None) -> tuple[SchedulerOutput, list[Sequence]]:
    """schedule + update, playing the model: every sampled row gets `token` (or tokens[request_id]). Returns the
    step and the sequences it finished."""
    out = sched.schedule()
    sched.check_integrity()
    sampled = [(tokens or {}).get(row.request_id, token) if row.sample else None for row in out.rows]
    finished = [seq for _, seq in sched.update(out, sampled) if seq.is_finished]
    sched.check_integrity()
    return out, finished


def rows(out: SchedulerOutput) -> list[tuple[str, int, bool]]:
    return [(row.request_id, row.num_tokens, row.sample) for row in out.rows]


def ids(out: SchedulerOutput) -> list[str]:
    return [row.request_id for row in out.rows]


# -- the token budget ---------------------------------------------------------------------------------------------


def test_decode_rows_get_one_token_and_prefill_fills_the_rest():
    sched = make_scheduler(budget=10)
    sched.add(make_seq("a", range(3)))
    sched.add(make_seq("b", range(4)))
    batch, _ = step(sched)
    assert rows(batch) == [("a", 3, True), ("b", 4, True)]
    sched.add(make_seq("c", range(30)))
    batch, _ = step(sched)
    assert rows(batch) == [("a", 1, True), ("b", 1, True), ("c", 8, False)]
    assert batch.total_tokens == 10


def test_long_prompt_is_chunked_until_the_last_chunk():
    sched = make_scheduler(budget=8)
    seq = make_seq("a", range(27))
    sched.add(seq)
    seen = []
    for _ in range(4):
        batch, _ = step(sched)
        seen.append(rows(batch))
    assert seen == [[("a", 8, False)], [("a", 8, False)], [("a", 8, False)], [("a", 3, True)]]
    assert seq.num_computed_tokens == 27 and seq.num_output_tokens == 1
    batch, _ = step(sched)
    assert rows(batch) == [("a", 1, True)]


def test_running_requests_are_served_before_waiting_ones():
    sched = make_scheduler(budget=12)
    sched.add(make_seq("a", range(20)))
    batch, _ = step(sched)
    assert rows(batch) == [("a", 12, False)]
    sched.add(make_seq("b", range(100, 105)))
    batch, _ = step(sched)  # a's remaining 8 first, b gets what is left
    assert rows(batch) == [("a", 8, True), ("b", 4, False)]
    batch, _ = step(sched)
    assert rows(batch) == [("a", 1, True), ("b", 1, True)]


def test_waiting_requests_are_admitted_in_arrival_order():
    sched = make_scheduler(budget=100)
    for name in "xyz":
        sched.add(make_seq(name, range(3)))
    batch, _ = step(sched)
    assert ids(batch) == ["x", "y", "z"]


def test_max_num_seqs_is_respected():
    sched = make_scheduler(max_num_seqs=2, budget=100)
    for name in "abc":
        sched.add(make_seq(name, range(3), max_tokens=2))
    batch, _ = step(sched)
    assert ids(batch) == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]
    batch, finished = step(sched)
    assert [s.request_id for s in finished] == ["a", "b"]
    assert ids(batch) == ["a", "b"]  # c was not admitted while a and b still ran
    batch, _ = step(sched)
    assert rows(batch) == [("c", 3, True)]


def test_prefix_hit_starts_at_the_cached_length():
    sched = make_scheduler(block_size=4)
    prompt = list(range(10))
    a = make_seq("a", prompt, max_tokens=1)
    sched.add(a)
    step(sched)
    assert a.finish_reason == "length" and a.num_cached_tokens == 0
    b = make_seq("b", prompt + [50, 51])
    sched.add(b)
    batch, _ = step(sched)
    assert rows(batch) == [("b", 4, True)]  # 8 of 12 tokens from the cache (2 full blocks)
    assert b.num_cached_tokens == 8
    assert b.num_computed_tokens == 12
    assert sched.block_manager.num_hits == 8


@pytest.mark.parametrize("prompt_len, caching, cached", [
    (8, True, 4),  # exactly two full blocks: the second is recomputed, the last token's logits are needed
    (10, False, 0),  # caching off: nothing is found
])
def test_prefix_hit_limits(prompt_len, caching, cached):
    sched = make_scheduler(block_size=4, caching=caching)
    prompt = list(range(prompt_len))
    sched.add(make_seq("a", prompt, max_tokens=1))
    step(sched)
    b = make_seq("b", prompt)
    sched.add(b)
    batch, _ = step(sched)
    assert rows(batch) == [("b", prompt_len - cached, True)]
    assert b.num_cached_tokens == cached


# -- preemption ---------------------------------------------------------------------------------------------------


def _three_full_sequences(caching: bool):
    """6 blocks of 4; a, b, c each hold 2 blocks with 8 tokens, all computed but the last; none free."""
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64, max_model_len=24, caching=caching)
    seqs = [make_seq(name, [i] * 4, max_tokens=12, ignore_eos=True) for i, name in enumerate("abc")]
    for s in seqs:
        sched.add(s)
    for _ in range(4):  # prompt, then 3 decode steps: 8 tokens, 7 computed
        batch, _ = step(sched)
        assert ids(batch) == ["a", "b", "c"]
    assert all(s.num_tokens == 8 and s.num_computed_tokens == 7 and len(s.block_table) == 2 for s in seqs)
    batch, _ = step(sched)  # token 8 still fits the second block
    assert sched.block_manager.num_free_blocks == 0 and sched.num_preemptions == 0
    return sched, seqs


@pytest.mark.parametrize("caching", [False, True])
def test_newest_running_sequence_is_preempted(caching):
    sched, (a, b, c) = _three_full_sequences(caching)
    sched.add(make_seq("d", [9] * 3))
    c_tokens = list(c.token_ids)
    assert c.num_tokens == 9
    batch, _ = step(sched)  # a needs a third block: c (the newest) goes
    assert rows(batch) == [("a", 1, True), ("b", 1, True)]
    assert c.status is SequenceStatus.WAITING
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert c.token_ids == c_tokens  # its generated tokens are kept, to be recomputed
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    assert [s.request_id for s in sched.waiting] == ["c", "d"]  # at the front, ahead of d
    assert sched.running == [a, b]
    assert [len(s.block_table) for s in (a, b)] == [3, 3]
    assert sched.block_manager.num_free_blocks == 0


@pytest.mark.parametrize("caching", [False, True])
def test_preempted_sequence_is_rescheduled_and_recomputes(caching):
    sched, (a, b, c) = _three_full_sequences(caching)
    step(sched)  # c preempted
    assert sched.num_preemptions == 1
    readmitted = None
    for _ in range(100):
        if not sched.has_work():
            break
        c_tokens_before = c.num_tokens
        was_waiting = c.status is SequenceStatus.WAITING
        batch, _ = step(sched)
        if was_waiting and "c" in ids(batch) and readmitted is None:
            row = batch.rows[ids(batch).index("c")]
            readmitted = (row.num_tokens, row.sample, c_tokens_before, c.num_cached_tokens)
    assert not sched.has_work()
    assert readmitted is not None
    n, sample, total, cached = readmitted
    assert total == 9  # 4 prompt + 5 generated tokens, all recomputed
    assert cached == 0  # the first schedule's hits are what is reported, not the recompute's
    assert n == total  # a and b took c's freed blocks (LRU) before it came back: no hits left even with caching
    assert sample  # the whole recompute fits the budget: the next token is sampled at once
    for s in (a, b, c):
        assert s.finish_reason == "length" and s.num_output_tokens == 12
    assert sched.block_manager.num_free_blocks == 6


def test_recompute_after_preemption_hits_its_own_cached_blocks():
    sched = make_scheduler(num_blocks=5, block_size=4, budget=64, caching=True)
    a = make_seq("a", [1] * 4, max_tokens=3, ignore_eos=True)
    b = make_seq("b", [2] * 12, max_tokens=5, ignore_eos=True)
    sched.add(a)
    sched.add(b)
    batch, _ = step(sched)
    assert rows(batch) == [("a", 4, True), ("b", 12, True)]
    assert a.block_table == [0] and b.block_table == [1, 2, 3]
    batch, _ = step(sched)  # a takes block 4; b needs a 4th block, none left: b (the newest) preempts itself
    assert rows(batch) == [("a", 1, True)]
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1 and sched.num_preemptions == 1
    assert sorted(sched.block_manager.cached.values()) == [0, 1, 2, 3]  # b's computed full blocks stay cached
    batch, finished = step(sched)  # b's recompute does not fit beside a yet
    assert rows(batch) == [("a", 1, True)] and finished == [a]
    batch, _ = step(sched)
    assert rows(batch) == [("b", 1, True)]  # 12 of its 13 tokens found in the cache
    assert b.block_table[:3] == [1, 2, 3]
    assert b.num_cached_tokens == 0  # what its first schedule found
    while sched.has_work():
        step(sched)
    assert b.num_output_tokens == 5


def test_a_sequence_that_preempts_itself_and_followers():
    # 4 blocks of 4. a and b hold 2 blocks each; when b (the newest) needs a block, it preempts itself.
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64, max_model_len=16, caching=False)
    a = make_seq("a", [1] * 4, max_tokens=10, ignore_eos=True)
    b = make_seq("b", [2] * 4, max_tokens=10, ignore_eos=True)
    sched.add(a)
    sched.add(b)
    while a.num_tokens < 9:
        step(sched)
    assert len(a.block_table) == len(b.block_table) == 2 and sched.block_manager.num_free_blocks == 0
    batch, _ = step(sched)  # a needs block 3: b goes; a continues
    assert rows(batch) == [("a", 1, True)]
    assert b.status is SequenceStatus.WAITING and sched.waiting[0] is b
    while sched.has_work():
        step(sched)
    assert a.num_output_tokens == 10 and b.num_output_tokens == 10


# -- finishing ----------------------------------------------------------------------------------------------------


def run_one(seq: Sequence, outputs: list[int], **kw) -> Sequence:
    sched = make_scheduler(**kw)
    sched.add(seq)
    for token in outputs:
        if seq.is_finished:
            break
        step(sched, token=token)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks or not seq.is_finished
    return seq


def test_max_tokens_finishes_with_length():
    seq = run_one(make_seq("a", range(5), max_tokens=3), [1, 2, 3, 4, 5])
    assert seq.output_token_ids == [1, 2, 3]
    assert seq.finish_reason == "length" and seq.stop_reason is None
    assert seq.status is SequenceStatus.FINISHED


def test_eos_finishes_with_stop():
    seq = run_one(make_seq("a", range(5)), [1, EOS, 3])
    assert seq.output_token_ids == [1, EOS]
    assert seq.finish_reason == "stop" and seq.stop_reason is None  # vLLM: EOS is no stop_token_ids hit


def test_ignore_eos_keeps_going():
    seq = run_one(make_seq("a", range(5), max_tokens=4, ignore_eos=True), [EOS] * 6)
    assert seq.output_token_ids == [EOS] * 4
    assert seq.finish_reason == "length"


def test_stop_token_ids_finish_with_stop():
    seq = run_one(make_seq("a", range(5), stop_token_ids=[42]), [1, 2, 42, 4])
    assert seq.output_token_ids == [1, 2, 42]
    assert seq.finish_reason == "stop" and seq.stop_reason == 42
    # stop_token_ids apply even with ignore_eos
    seq = run_one(make_seq("b", range(5), stop_token_ids=[42], ignore_eos=True), [EOS, 42, 4])
    assert seq.output_token_ids == [EOS, 42] and seq.stop_reason == 42


def test_min_tokens_defers_stop():
    # The sampler masks stop tokens before min_tokens; the scheduler only must not stop on them.
    seq = run_one(make_seq("a", range(5), min_tokens=2), [EOS, EOS, EOS, 1])
    assert seq.output_token_ids == [EOS, EOS, EOS]
    assert seq.finish_reason == "stop" and seq.stop_reason is None
    seq = run_one(make_seq("b", range(5), min_tokens=2, stop_token_ids=[42]), [42, 1, 42, 1])
    assert seq.output_token_ids == [42, 1, 42] and seq.finish_reason == "stop"


def test_max_model_len_finishes_with_length():
    seq = run_one(make_seq("a", range(8), max_tokens=None), [1] * 10, max_model_len=11)
    assert seq.num_tokens == 11 and seq.output_token_ids == [1, 1, 1]
    assert seq.finish_reason == "length"


def test_finished_sequence_is_not_scheduled_again():
    sched = make_scheduler()
    a = make_seq("a", range(3), max_tokens=1)
    sched.add(a)
    _, finished = step(sched)
    assert finished == [a]
    assert not sched.has_work()
    assert not sched.schedule()


# -- abort --------------------------------------------------------------------------------------------------------


def test_abort_waiting_and_running_frees_everything():
    sched = make_scheduler(num_blocks=16, max_num_seqs=1)
    a, b = make_seq("a", range(10)), make_seq("b", range(6))
    sched.add(a)
    sched.add(b)
    step(sched)
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    assert sched.abort("b") is b
    assert b.finish_reason == "abort" and b.is_finished and list(sched.waiting) == []
    sched.check_integrity()
    assert sched.abort("a") is a
    assert a.finish_reason == "abort" and a.block_table == [] and sched.running == []
    sched.check_integrity()
    assert sched.block_manager.num_free_blocks == 16
    assert not sched.has_work()
    assert sched.abort("a") is None and sched.abort("nope") is None


def test_abort_mid_prefill_keeps_shared_prefix_for_others():
    sched = make_scheduler(block_size=4, budget=64)
    prompt = list(range(12))
    a = make_seq("a", prompt + [1])
    sched.add(a)
    step(sched)
    b = make_seq("b", prompt + [2])
    sched.add(b)
    step(sched)
    assert b.block_table[:3] == a.block_table[:3]
    sched.abort("a")
    sched.check_integrity()
    assert all(sched.block_manager.blocks[i].ref_count == 1 for i in b.block_table)
    sched.abort("b")
    sched.check_integrity()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_a_request_aborted_while_its_step_runs_and_sent_again_starts_clean():
    """Overlapped steps: the id of a request aborted while its step ran may come back before that step's token
    does; the token belongs to the old request, not the new one."""
    sched = make_scheduler()
    sched.add(make_seq("a", range(5)))
    in_flight = sched.schedule()
    sched.abort("a")
    again = make_seq("a", range(5))
    sched.add(again)
    assert sched.update(in_flight, [7]) == []
    assert again.token_ids == list(range(5)) and again.num_pending == 0 and again.num_computed_tokens == 0
    sched.check_integrity()
    out, _ = step(sched)
    assert rows(out) == [("a", 5, True)]
