"""Messages between the front end and the engine core: small typed structs, one output message per step."""

from __future__ import annotations

import msgspec

from engine.sampling_params import SamplingParams


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


class AbortRequests(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


class TokenLogprobs(msgspec.Struct, array_like=True):
    top_ids: list[int]
    top_logprobs: list[float]
    logprob: float  # of the chosen token
    rank: int  # of the chosen token, 1 = most likely


class RequestUpdate(msgspec.Struct, array_like=True):
    request_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None  # the stop token id, when one ended it
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    # prompt_logprobs: the next prompt tokens' entries (a long prompt's come over several steps, in order)
    prompt_logprobs: list[TokenLogprobs] | None = None


class SchedulerStats(msgspec.Struct, array_like=True):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0  # since start
    prefix_cache_queries: int = 0  # tokens looked up, since start
    prefix_cache_hits: int = 0  # tokens found, since start


class StepOutputs(msgspec.Struct, tag=True, array_like=True):
    updates: list[RequestUpdate]
    stats: SchedulerStats


class EngineInfo(msgspec.Struct, tag=True, array_like=True):
    """What the core reports once it is ready."""
    model_dir: str
    dtype: str
    device: str
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    vocab_size: int
    max_batch_total_tokens: int


class EngineFailure(msgspec.Struct, tag=True, array_like=True):
    error_type: str
    message: str


ToCore = AddRequest | AbortRequests | Shutdown
FromCore = StepOutputs | EngineInfo | EngineFailure
