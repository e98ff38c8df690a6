"""The token-budget scheduler.

There is no prefill phase and no decode phase: each step hands out up to max_num_batched_tokens tokens so that
every request's computed tokens catch up with the tokens it has. Running requests are served first, oldest
first; waiting requests fill what is left, a long prompt taking several steps (chunked prefill). Prompt blocks
found in the prefix cache count as computed. When a block is needed and none is free, the newest running
request is preempted: its blocks are freed and its tokens recomputed later.

A step's bookkeeping has two halves so the next step can be scheduled while this one runs on the device:
`advance` once the step is launched (its tokens count as computed; each sampled row owes a pending token), and
`update` once its sampled tokens are back (they are appended; finished requests leave).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    # whether each sequence reaches its last token this step, so a new token is sampled for it
    sample: list[bool] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- requests -------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, "abort")
                    return seq
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending and self._reached_length(seq):
                i += 1  # its last token is still on the device: nothing more to compute
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.can_allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq preempted itself: everything after it is gone too
            self.block_manager.allocate(seq, n)
            self._add(batch, seq, n)
            budget -= n
            i += 1

        # New work only when nothing had to be evicted this step (it would be evicted again at once).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]  # holds no blocks: preemption freed them, or it is new
            prefix = self.block_manager.find_cached_prefix(seq)
            computed = len(prefix) * self.block_manager.block_size
            n = min(seq.num_tokens - computed, budget)
            if not self.block_manager.can_allocate(seq, computed + n, prefix):
                break
            self.waiting.popleft()
            self.block_manager.take_prefix(seq, prefix)
            self.block_manager.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = seq.first_scheduled_time or time.time()
            self.running.append(seq)
            self._add(batch, seq, n)
            budget -= n
        return batch

    def _add(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        batch.sample.append(seq.num_computed_tokens + n == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- after the model ran ---------------------------------------------------------------------------------
    def advance(self, batch: ScheduledBatch) -> None:
        """The step is launched: its tokens count as computed, and each sampled row owes one pending token."""
        for seq, n, sample in zip(batch.seqs, batch.num_new_tokens, batch.sample):
            seq.num_computed_tokens += n
            seq.num_pending += sample

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """The step's sampled tokens are back (advance came first): append them. Returns finished sequences.
        A request that finished or was aborted while the step ran drops what the step computed for it."""
        finished = []
        for seq, token in zip(batch.seqs, sampled):
            if token is not None:
                seq.num_pending -= 1
            if seq.is_finished:
                continue
            if token is not None:
                seq.token_ids.append(token)
            self.block_manager.cache_full_blocks(seq)
            reason = None if token is None else self._finish_reason(seq, token)
            if reason:
                # preempted while the step ran: it waits, and now need not come back
                (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def _reached_length(self, seq: Sequence) -> bool:
        """Whether seq, counting pending tokens, has all the tokens max_tokens or max_model_len allow."""
        max_tokens = seq.params.max_tokens
        return (max_tokens is not None and seq.num_sampled >= max_tokens) or (
            seq.num_tokens >= self.max_model_len)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if seq.num_output_tokens > params.min_tokens and token in seq.stop_ids:
            # vLLM's convention: stop_reason names a stop_token_ids hit; EOS leaves it None
            seq.stop_reason = token if token in params.stop_token_ids else None
            return "stop"
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return "length"
        if len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free_sequence(seq)

    def check_integrity(self) -> None:
        self.block_manager.check_integrity([*self.running, *self.waiting])
        assert all(s.status is SequenceStatus.RUNNING for s in self.running)
        assert all(s.status is SequenceStatus.WAITING for s in self.waiting)
        assert all(not s.block_table for s in self.waiting), "waiting sequences hold no blocks"
