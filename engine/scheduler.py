"""The token-budget scheduler.

There is no prefill phase and no decode phase: each step hands out up to max_num_batched_tokens tokens so that
every request's computed tokens catch up with the tokens it has. Running requests are served first, oldest
first; waiting requests fill what is left, a long prompt taking several steps (chunked prefill). Prompt blocks
found in the prefix cache count as computed. When a block is needed and none is free, the newest running
request is preempted: its blocks are freed and its tokens recomputed later.

`schedule` hands the model runner a SchedulerOutput: plain data, no Sequence. Its tokens count as computed at
once and each sampled row owes a pending token, so the next step can be scheduled while this one runs on the
device; `update` appends the sampled tokens once they are back (finished requests leave).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, SequenceStatus
from engine.structured_output import consume


@dataclass(slots=True)  # slots: hundreds are made a step
class ScheduledRequest:
    """One request's share of a step: what the runner needs to lay out its inputs and sample it. The lists are
    the request's own (not copies): they hold until the step is launched, and `token_ids` tells the sequence the
    row was scheduled from from a later one under the same request id."""
    request_id: str
    token_ids: list[int]  # the tokens known on the host: prompt, then output (a pending one is not there yet)
    start: int  # tokens whose KV is already computed: the position of this step's first token
    num_tokens: int  # tokens this step (1 for a decode)
    block_table: list[int]  # the cache blocks of its whole context, in order
    sample: bool  # the step reaches its last token, so a new one is sampled
    params: SamplingParams
    generator: object | None = None  # a seeded request's own torch.Generator
    num_prompt_tokens: int = 0
    num_sampled: int = 0  # output tokens sampled before this step, those still on the device included
    prompt_logprobs_from: int = 0  # prompt_logprobs: positions before this were reported by an earlier step

    @property
    def input_pending(self) -> bool:
        """Its one input token is still on the device (sampled by the step in flight)."""
        return self.start >= len(self.token_ids)


@dataclass
class SchedulerOutput:
    """One step. Decodes bring one new token each and come first (the shape CUDA graphs capture, and the rows a
    backend gives its decode kernel); prefills bring several (a prompt, a chunk of one, the rest after a cached
    prefix). Blocks never move: a row's block table says where its KV lives, and preemption only frees."""
    decodes: list[ScheduledRequest] = field(default_factory=list)
    prefills: list[ScheduledRequest] = field(default_factory=list)

    @property
    def rows(self) -> list[ScheduledRequest]:
        return self.decodes + self.prefills

    @property
    def total_tokens(self) -> int:
        return len(self.decodes) + sum(r.num_tokens for r in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}  # waiting and running, by request id
        self.num_preemptions = 0

    # -- requests -------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request_id {seq.request_id!r} is already in the engine")
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
        self._finish(seq, "abort")
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_computed_tokens == seq.num_tokens or seq.num_pending and self._reached_length(seq):
                i += 1  # nothing to compute (max_tokens 0, its prompt done), or its last token is on the device
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
            self._add(out, seq, n)
            budget -= n
            i += 1

        # New work only when nothing had to be evicted this step (it would be evicted again at once).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]  # holds no blocks: preemption freed them, or it is new
            prefix = [] if seq.owes_prompt_logprobs else self.block_manager.find_cached_prefix(seq)
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
            self._add(out, seq, n)
            budget -= n
        return out

    def _add(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        """Put seq's n tokens in the step, and count them as computed (a sampled row owes a pending token)."""
        start = seq.num_computed_tokens
        sample = start + n == seq.num_tokens and seq.params.max_tokens != 0  # 0: the prompt's logprobs only
        row = ScheduledRequest(seq.request_id, seq.token_ids, start, n, seq.block_table, sample, seq.params,
                               seq.generator, seq.num_prompt_tokens, seq.num_sampled, seq.prompt_logprobs_from)
        (out.decodes if n == 1 else out.prefills).append(row)
        seq.num_computed_tokens += n
        seq.num_pending += sample
        seq.prompt_logprobs_from = max(seq.prompt_logprobs_from, start + n)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- after the model ran ---------------------------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: list[int | None]) -> list[tuple[int, Sequence]]:
        """The step's sampled tokens are back, one per row of out.rows (None for a prompt chunk): append them.
        Returns (row, sequence) for each token appended, each request ended without one (max_tokens 0) and each
        row of a request that wants prompt logprobs; `seq.is_finished` says which ended. A request that
        finished or was aborted while the step ran drops what the step computed for it."""
        appended = []
        for i, (row, token) in enumerate(zip(out.rows, sampled)):
            seq = self.requests.get(row.request_id)
            if seq is None or seq.token_ids is not row.token_ids:
                continue  # it finished or was aborted while the step ran (and its id may be in use again)
            if token is not None:
                seq.num_pending -= 1
                seq.token_ids.append(token)
            self.block_manager.cache_full_blocks(seq)
            reason = self._finish_reason(seq, token) if token is not None else self._prompt_done(seq, row)
            if token is not None or reason or seq.params.prompt_logprobs is not None:
                appended.append((i, seq))
            if reason:
                # preempted while the step ran: it waits, and now need not come back
                (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
                self._finish(seq, reason)
        return appended

    @staticmethod
    def _prompt_done(seq: Sequence, row: ScheduledRequest) -> str | None:
        """max_tokens 0 (prompt logprobs alone): the request ends once its whole prompt is computed."""
        done = seq.params.max_tokens == 0 and row.start + row.num_tokens >= seq.num_prompt_tokens
        return "length" if done else None

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
        if seq.matcher is not None and consume(seq.matcher, token):
            return "stop"  # the grammar is complete: only EOS could follow
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return "length"
        if len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.num_pending = 0  # tokens of steps still in flight for it are dropped
        self.block_manager.free_sequence(seq)
        del self.requests[seq.request_id]

    def check_integrity(self) -> None:
        self.block_manager.check_integrity([*self.running, *self.waiting])
        assert all(s.status is SequenceStatus.RUNNING for s in self.running)
        assert all(s.status is SequenceStatus.WAITING for s in self.waiting)
        assert all(not s.block_table for s in self.waiting), "waiting sequences hold no blocks"
        assert set(self.requests) == {s.request_id for s in (*self.running, *self.waiting)}
