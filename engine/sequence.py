"""Sequence: one request's state inside the engine core. Nothing else keeps per-request state."""

from __future__ import annotations

import enum

from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float = 0.0,
                 generator=None):
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.stop_ids = params.stop_ids()
        self.arrival_time = arrival_time
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (or is being written by a launched step)
        self.num_pending = 0  # tokens sampled by launched steps, not yet appended to token_ids
        self.num_hashed_blocks = 0  # leading blocks registered in the prefix cache
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first schedule
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | None = None
        # A seeded request draws from its own torch.Generator (made by the runner, on its device), so its tokens
        # don't depend on the rest of the batch.
        self.generator = generator
        self.matcher = None  # structured output: its llguidance matcher, following the output tokens
        # prompt_logprobs: positions below this had theirs computed (each is reported once, preempted or not)
        self.prompt_logprobs_from = 0

    @property
    def num_tokens(self) -> int:
        """Tokens the scheduler plans with: those known here and those still on the device."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        """Output tokens known here (pending ones excluded)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_sampled(self) -> int:
        """Output tokens sampled so far, those still on the device included."""
        return self.num_tokens - self.num_prompt_tokens

    @property
    def owes_prompt_logprobs(self) -> bool:
        """Whether prompt logprobs are still to be computed: then no prompt block may come from the prefix cache."""
        return self.params.prompt_logprobs is not None and self.prompt_logprobs_from < self.num_prompt_tokens - 1

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
