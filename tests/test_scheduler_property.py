"""Property-based test of the scheduler and block manager: random submits, aborts and steps."""

from __future__ import annotations

import random
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.block_manager as block_manager_module
from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus

# -- property test ------------------------------------------------------------------------------------------------

ALPHABET = 4  # tokens 0..3; 3 is EOS. Small so prefixes repeat and prefix-cache hits happen.


class FakeKV:
    """Plays the KV cache: each slot remembers which (position, prefix) it was computed for, so a prefix hit that
    serves the wrong block, or a write into a block someone else still reads, is caught at the next schedule.
    Also plays the device's side of overlapped steps: tokens it sampled that the scheduler has not seen yet."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots: dict[tuple[int, int], int] = {}
        self.unseen: dict[str, list[int]] = {}  # request id -> tokens sampled by steps not yet updated

    @staticmethod
    def prefix_keys(tokens: list[int]) -> list[int]:
        keys, h = [], 0
        for t in tokens:
            h = hash((h, t))
            keys.append(h)
        return keys

    def run(self, out: SchedulerOutput) -> None:
        """Read and write the KV of each row as the runner would: from its plain data alone."""
        bs = self.bm.block_size
        for row in out.rows:
            keys = self.prefix_keys(row.token_ids + self.unseen.get(row.request_id, []))
            for p in range(row.start):
                assert self.slots.get((row.block_table[p // bs], p % bs)) == keys[p], (
                    f"{row.request_id}: wrong KV at position {p}"
                )
            for p in range(row.start, row.start + row.num_tokens):
                block = row.block_table[p // bs]
                assert self.bm.blocks[block].ref_count == 1, f"{row.request_id}: writes into shared block {block}"
                self.slots[(block, p % bs)] = keys[p]

    def sample(self, out: SchedulerOutput, rnd: random.Random) -> list[int | None]:
        sampled = [rnd.randrange(ALPHABET) if row.sample else None for row in out.rows]
        for row, token in zip(out.rows, sampled):
            if token is not None:
                self.unseen.setdefault(row.request_id, []).append(token)
        return sampled

    def seen(self, out: SchedulerOutput, sampled: list[int | None]) -> None:
        for row, token in zip(out.rows, sampled):
            if token is not None:
                assert self.unseen[row.request_id].pop(0) == token


def check_batch(sched: Scheduler, out: SchedulerOutput, had_work: bool) -> None:
    bm = sched.block_manager
    assert out.total_tokens <= sched.max_num_batched_tokens
    assert len(out.rows) <= sched.max_num_seqs
    assert len({row.request_id for row in out.rows}) == len(out.rows)
    assert all(row.num_tokens == 1 for row in out.decodes) and all(row.num_tokens > 1 for row in out.prefills)
    if had_work:
        assert out, "work left but nothing scheduled"
    for row in out.rows:
        seq, n = sched.requests[row.request_id], row.num_tokens
        tokens_before = seq.num_tokens - row.sample  # the step's sampled row already owes a pending token
        assert seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens == row.start + n
        assert n >= 1 and row.start + n <= tokens_before
        assert row.sample == (row.start + n == tokens_before)
        assert row.block_table is seq.block_table and len(seq.block_table) >= bm.blocks_for(row.start + n)
        # a request's last token (max_tokens or max_model_len) is never fed back: no step computes past it
        last = min(seq.num_prompt_tokens + seq.params.max_tokens, sched.max_model_len) - 1
        assert row.start + n <= last, f"{seq.request_id} computes past its last token"


class Driver:
    """Steps the scheduler as the engine core does: with `overlap`, step N+1 is scheduled and launched before
    step N's tokens are applied (update), so requests carry pending tokens while they are scheduled."""

    def __init__(self, sched: Scheduler, kv: FakeKV, rnd: random.Random, overlap: bool):
        self.sched, self.kv, self.rnd, self.overlap = sched, kv, rnd, overlap
        self.in_flight: tuple[SchedulerOutput, list[int | None]] | None = None

    def has_work(self) -> bool:
        return self.sched.has_work() or self.in_flight is not None

    def step(self) -> None:
        sched = self.sched
        # with a step in flight, every running request may be waiting on its last pending token
        had_work = sched.has_work() and self.in_flight is None
        batch = sched.schedule()
        sched.check_integrity()
        check_batch(sched, batch, had_work)
        launched = None
        if batch:
            self.kv.run(batch)
            launched = (batch, self.kv.sample(batch, self.rnd))
        if self.in_flight is not None:
            self.finish(*self.in_flight)
        self.in_flight = launched
        if launched is not None and not self.overlap:
            self.finish(*launched)
            self.in_flight = None

    def finish(self, batch: SchedulerOutput, sampled: list[int | None]) -> None:
        self.kv.seen(batch, sampled)
        self.sched.update(batch, sampled)


def run_random_ops(data, overlap: bool = False, ops_max: int = 40) -> None:
    block_size = data.draw(st.sampled_from([8, 16]), label="block_size")
    num_blocks = data.draw(st.one_of(st.integers(4, 12), st.integers(4, 40)), label="num_blocks")  # small: preempts
    budget = data.draw(st.integers(8, 64), label="budget")
    max_num_seqs = data.draw(st.integers(1, 8), label="max_num_seqs")
    caching = data.draw(st.booleans(), label="prefix_caching")
    pool = num_blocks * block_size
    max_model_len = data.draw(st.integers(8, pool), label="max_model_len")
    rnd = data.draw(st.randoms(use_true_random=False), label="tokens")

    sched = Scheduler(BlockManager(num_blocks, block_size, caching), max_num_seqs, budget, max_model_len)
    driver = Driver(sched, FakeKV(sched.block_manager), rnd, overlap)
    seqs: list[Sequence] = []
    aborted: set[str] = set()
    stems = [rnd.choices(range(ALPHABET), k=60) for _ in range(3)] + [[0] * 60]  # so prompts share prefixes

    # hypothesis favours short lists: start with a burst of requests so the pool is actually contended
    ops = ["submit"] * data.draw(st.integers(1, 8), label="initial_requests")
    ops += data.draw(st.lists(st.sampled_from(["submit", "submit", "abort", "step", "step", "step"]),
                              min_size=4, max_size=ops_max), label="ops")
    for op in ops:
        if op == "submit":
            length = data.draw(st.integers(1, min(60, max_model_len - 1)), label="prompt_len")
            stem = data.draw(st.sampled_from(stems), label="stem")
            shared = length if data.draw(st.booleans(), label="all_shared") else data.draw(st.integers(0, length))
            tail = data.draw(st.lists(st.integers(0, ALPHABET - 1), min_size=length - shared, max_size=length - shared))
            prompt = stem[:shared] + tail
            max_tokens = data.draw(st.integers(1, 24), label="max_tokens")
            params = SamplingParams(
                max_tokens=max_tokens,
                min_tokens=data.draw(st.integers(0, max_tokens), label="min_tokens"),
                ignore_eos=data.draw(st.booleans(), label="ignore_eos"),
                stop_token_ids=data.draw(st.sampled_from([[], [2]]), label="stop_token_ids"),
                eos_token_ids=[ALPHABET - 1],
            )
            seq = Sequence(f"r{len(seqs)}", prompt, params)
            # the front end's guarantee: every request fits the pool alone
            assert len(prompt) < max_model_len <= pool
            seqs.append(seq)
            sched.add(seq)
        elif op == "abort":
            live = [s for s in seqs if not s.is_finished]
            if live:
                victim = live[data.draw(st.integers(0, len(live) - 1), label="abort")]
                assert sched.abort(victim.request_id) is victim
                aborted.add(victim.request_id)
                assert victim.block_table == []
        else:
            driver.step()
        sched.check_integrity()

    limit = 50 + 4 * sum(s.num_prompt_tokens + (s.params.max_tokens or 0) for s in seqs) * max(1, len(seqs))
    steps = 0
    while driver.has_work():
        steps += 1
        assert steps <= limit, f"livelock: {len(sched.running)} running, {len(sched.waiting)} waiting"
        driver.step()
        sched.check_integrity()

    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    for seq in seqs:
        assert seq.is_finished, seq
        assert seq.block_table == [] and seq.num_pending == 0
        if seq.request_id in aborted:
            assert seq.finish_reason == "abort"
            continue
        assert 1 <= seq.num_output_tokens <= seq.params.max_tokens, seq
        assert seq.num_tokens <= max_model_len
        last = seq.output_token_ids[-1]
        if seq.finish_reason == "stop":
            assert last in seq.stop_ids
            assert seq.stop_reason == (last if last in seq.params.stop_token_ids else None)
            assert seq.num_output_tokens > seq.params.min_tokens
        else:
            assert seq.finish_reason == "length"
            assert seq.num_output_tokens == seq.params.max_tokens or seq.num_tokens == max_model_len
        # no stop token went unnoticed before the end (once min_tokens were out)
        outs = seq.output_token_ids
        assert not any(t in seq.stop_ids for t in outs[seq.params.min_tokens : -1])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans())
def test_random_operations_keep_bookkeeping_and_drain(data, overlap):
    run_random_ops(data, overlap)


def _colliding_hash(parent, tokens):
    return hash((parent, tokens)) % 3  # almost every lookup collides; hits must still be confirmed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans())
def test_random_operations_with_colliding_hashes(data, overlap):
    with mock.patch.object(block_manager_module, "block_hash", _colliding_hash):
        run_random_ops(data, overlap)
