"""Prompt logprobs (vLLM's `prompt_logprobs`): each prompt token's logprob given the tokens before it, its rank
and the top-k alternatives, computed from the hidden states of the prefill pass.

Position i's logits predict token i + 1, so a chunk [start, end) of a prompt predicts tokens start+1 .. end: the
last of them is the next chunk's first, already known. Nothing predicts the first prompt token. A row reports
positions from `prompt_logprobs_from` on only: after a preemption the prompt is computed again, and each
position is reported once. Logits are made SLICE rows at a time: a long chunk's [tokens, vocab] in float32
would take gigabytes (the warmup's worst prefill asks for prompt logprobs, so its peak is in the KV sizing).
"""

from __future__ import annotations

import torch

from engine.protocol import TokenLogprobs
from engine.sampling_inputs import to_device
from engine.scheduler import ScheduledRequest

SLICE = 256  # rows of logits at a time: about what the sampler already takes for max_num_seqs rows


def positions(row: ScheduledRequest) -> range:
    """The positions of row's tokens whose logits predict a prompt token not yet reported."""
    if row.params.prompt_logprobs is None:
        return range(0)
    low = max(row.start, row.prompt_logprobs_from)
    return range(low, max(low, min(row.start + row.num_tokens, row.num_prompt_tokens - 1)))


def reports_prompt_logprobs(rows: list[ScheduledRequest]) -> bool:
    """Whether any row reports prompt logprobs (a step that does runs eagerly: CUDA graphs give no hidden states)."""
    return any(row.params.prompt_logprobs is not None and positions(row) for row in rows)


def wanted(rows: list[ScheduledRequest]) -> list[tuple[int, int, range]]:
    """(row index, offset of its first token in the step, positions) of each row that reports any."""
    out, offset = [], 0
    for i, row in enumerate(rows):
        if span := positions(row):
            out.append((i, offset, span))
        offset += row.num_tokens
    return out


class PendingPromptLogprobs:
    """A step's prompt logprobs while their copy to the host is in flight; `result()` waits for it."""

    def __init__(self, plan: list[tuple[int, int, int]], tensors: tuple[torch.Tensor, ...]) -> None:
        self._plan = plan  # (row index, positions, k) in the order of the tensors' rows
        self._host = [t.to("cpu", non_blocking=True) for t in tensors]  # pinned when from CUDA
        self._event = None
        if tensors[0].device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> dict[int, list[TokenLogprobs]]:
        """Per row index of the step: one entry per position, in order."""
        if self._event is not None:
            self._event.synchronize()
        top_lp, top_ids, chosen, ranks = [t.tolist() for t in self._host]
        out, j = {}, 0
        for row, count, k in self._plan:
            out[row] = [TokenLogprobs(top_ids[m][:k], top_lp[m][:k], chosen[m], ranks[m]) for m in range(j, j + count)]
            j += count
        return out


def queue_prompt_logprobs(model, hidden: torch.Tensor, rows: list[ScheduledRequest]) -> PendingPromptLogprobs | None:
    """Queue the prompt logprobs of the step's rows from `hidden` ([step tokens, hidden], the eager forward's
    output); None when no row reports any. Nothing waits for the device here."""
    plan = wanted(rows)
    if not plan:
        return None
    index, targets = [], []
    for i, offset, span in plan:
        row = rows[i]
        index.extend(range(offset + span.start - row.start, offset + span.stop - row.start))
        targets.extend(row.token_ids[span.start + 1 : span.stop + 1])
    device, n = hidden.device, len(index)
    k = max(rows[i].params.prompt_logprobs for i, _, _ in plan)
    index_d, targets_d = to_device(index, torch.long, device), to_device(targets, torch.long, device)
    top_lp = torch.empty(n, k, dtype=torch.float32, device=device)
    top_ids = torch.empty(n, k, dtype=torch.long, device=device)
    chosen = torch.empty(n, dtype=torch.float32, device=device)
    ranks = torch.empty(n, dtype=torch.long, device=device)
    for s in range(0, n, SLICE):
        e = min(n, s + SLICE)
        lp = torch.log_softmax(model.compute_logits(hidden.index_select(0, index_d[s:e])).float(), dim=-1)
        chosen[s:e] = lp.gather(-1, targets_d[s:e, None]).squeeze(-1)
        ranks[s:e] = (lp > chosen[s:e, None]).sum(dim=-1) + 1  # 1 = most likely, as the sampler ranks
        if k:
            top_lp[s:e], top_ids[s:e] = lp.topk(k, dim=-1)
    return PendingPromptLogprobs([(i, len(span), rows[i].params.prompt_logprobs) for i, _, span in plan],
                                 (top_lp, top_ids, chosen, ranks))
