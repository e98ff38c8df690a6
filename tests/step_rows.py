"""Steps and attention metadata for tests, built by the engine's own StepInputs (the one place metadata is made)
from plain lists, as the scheduler would describe them."""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRequest
from engine.step_inputs import StepInputs


def row(token_ids: list[int], start: int, num_tokens: int, block_table: list[int], sample: bool = True,
        request_id: str = "r", params: SamplingParams | None = None) -> ScheduledRequest:
    return ScheduledRequest(request_id, list(token_ids), start, num_tokens, list(block_table), sample,
                            params or SamplingParams(max_tokens=4), num_prompt_tokens=len(token_ids))


def metadata(query_lens: list[int], seq_lens: list[int], tables: list[list[int]], block_size: int, device,
             full_width: int | None = None):
    """The metadata of a step whose sequence i brings query_lens[i] tokens ending at context seq_lens[i]. With
    full_width, a decode step is laid out as for a CUDA graph: block tables full_width blocks wide."""
    rows = [row([0] * s, s - q, q, t, request_id=f"r{i}") for i, (q, s, t) in enumerate(zip(query_lens, seq_lens,
                                                                                            tables))]
    width = full_width or max(len(t) for t in tables)
    inputs = StepInputs(sum(query_lens), len(rows), width, block_size, torch.device(device))
    return inputs.prepare(rows, pad_to=len(rows) if full_width else None)[2]
