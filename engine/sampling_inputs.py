"""The step's sampled rows as the sampler's tensors (layers/sampler.py takes tensors, never request state).

Every host list goes to the device through a pinned non-blocking copy: a plain copy to CUDA would wait for the
whole stream, so building a step's sampling never waits for the step before it. Only what the rows use is
built: an all-greedy batch copies nothing.
"""

from __future__ import annotations

import torch

from engine.layers.sampler import LogitEdits, SamplingTensors
from engine.scheduler import ScheduledRequest


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on the device without waiting for it."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _bans_stop_tokens(row: ScheduledRequest) -> bool:
    """Whether stop tokens are still banned: fewer than min_tokens sampled (pending ones count)."""
    return row.num_sampled < row.params.min_tokens and bool(row.params.stop_ids())


def _is_plain(row: ScheduledRequest) -> bool:
    """Whether a row needs nothing but its temperature (and draws from the shared generator)."""
    p = row.params
    return not (p.needs_penalties or p.logit_bias or _bans_stop_tokens(row) or row.generator is not None
                or p.top_k > 0 or p.top_p < 1.0 or p.min_p)


def sampling_tensors(rows: list[ScheduledRequest], device: torch.device, vocab_size: int) -> SamplingTensors:
    params = [r.params for r in rows]
    want = [p.logprobs for p in params]
    all_greedy = all(p.greedy for p in params)
    plain = all(_is_plain(r) for r in rows)
    t = SamplingTensors(len(rows), all_greedy, plain,
                        logprobs=want if any(k is not None for k in want) else None)
    if plain:
        if not all_greedy:
            t.inv_temperature = to_device([0.0 if p.greedy else 1.0 / p.temperature for p in params], torch.float32,
                                          device)
        return t
    t.edits = [e for i, r in enumerate(rows) if (e := _edits(i, r, device, vocab_size)) is not None]
    if all_greedy:
        return t
    t.greedy = to_device([p.greedy for p in params], torch.bool, device)
    t.temperature = to_device([1.0 if p.greedy else p.temperature for p in params], torch.float32, device)
    if any(p.top_k > 0 for p in params):
        t.top_k = to_device([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.long, device)
    if any(p.top_p < 1.0 for p in params):
        t.top_p = to_device([p.top_p for p in params], torch.float32, device)
    if any(p.min_p for p in params):
        t.min_p = to_device([p.min_p for p in params], torch.float32, device)
    if any(r.generator is not None for r in rows):
        t.generators = [r.generator for r in rows]
    return t


def _edits(i: int, row: ScheduledRequest, device: torch.device, vocab_size: int) -> LogitEdits | None:
    """Row i's logit edits, or None when it has none. Every token id is inside the vocabulary: prompts and
    logit_bias keys are checked at submit time, outputs are sampled."""
    p = row.params
    e = LogitEdits(i)
    if p.repetition_penalty != 1.0:
        e.seen_ids, e.repetition_penalty = to_device(row.token_ids, torch.long, device), p.repetition_penalty
    output = row.token_ids[row.num_prompt_tokens :]
    if output and (p.frequency_penalty or p.presence_penalty):
        e.output_ids = to_device(output, torch.long, device)
        e.presence_penalty, e.frequency_penalty = p.presence_penalty, p.frequency_penalty
    if p.logit_bias:
        e.bias_ids = to_device(list(p.logit_bias), torch.long, device)
        e.bias_values = to_device(list(p.logit_bias.values()), torch.float32, device)
    if _bans_stop_tokens(row):
        e.banned_ids = to_device([t for t in p.stop_ids() if t < vocab_size], torch.long, device)
    return e if any(x is not None for x in (e.seen_ids, e.output_ids, e.bias_ids, e.banned_ids)) else None
