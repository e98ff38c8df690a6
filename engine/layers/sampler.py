"""Sampling for a batch of sequences: penalties, logit bias, min_tokens, temperature, top-k/top-p/min-p.

Logprobs are those of the model's raw distribution (log_softmax of the logits), as vLLM returns by default.
Random draws use the exponential race (argmax of p / q with q ~ Exp(1)), which equals sampling from p; rows of
seeded requests draw q from their own generator, so their tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sequence import Sequence

try:  # the fused CUDA path; without triton every row takes the torch path
    from engine.kernels.sampling import sample_tokens
except ImportError:  # pragma: no cover
    sample_tokens = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # when any row asked for logprobs: per row, (top ids, top logprobs, chosen logprob, chosen rank) or None
    logprobs: list[tuple[list[int], list[float], float, int] | None] | None


class PendingSample:
    """A step's sampled tokens while their copy to the host is in flight. `token_ids` stays on the device,
    where the next step can read its inputs without waiting; `result()` is the step's one wait."""

    def __init__(self, token_ids: torch.Tensor, extras: tuple[torch.Tensor, ...], want: list[int | None] | None):
        self.token_ids = token_ids
        self._want = want
        self._host = [t.to("cpu", non_blocking=True) for t in (token_ids, *extras)]  # pinned when from CUDA
        self._event = None
        if token_ids.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> SamplerOutput:
        if self._event is not None:
            self._event.synchronize()
        chosen, *extras = [t.tolist() for t in self._host]
        if self._want is None:
            return SamplerOutput(chosen, None)
        top_lp, top_ids, chosen_lp, ranks = extras
        entries = [
            None if n is None else (top_ids[i][:n], top_lp[i][:n], chosen_lp[i], ranks[i])
            for i, n in enumerate(self._want)
        ]
        return SamplerOutput(chosen, entries)


class Sampler:
    def __init__(self) -> None:
        self._zero_buffer: torch.Tensor | None = None

    def _zeros(self, n: int, device: torch.device) -> torch.Tensor:
        """n float32 zeros on the device (greedy inverse temperatures), from a buffer that is never written."""
        if self._zero_buffer is None or self._zero_buffer.numel() < n or self._zero_buffer.device != device:
            self._zero_buffer = torch.zeros(max(n, 256), dtype=torch.float32, device=device)
        return self._zero_buffer[:n]

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        return self.sample(logits, seqs).result()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> PendingSample:
        """Launch the sampling of one token per row; nothing waits for the device here."""
        params = [s.params for s in seqs]
        want_logprobs = [p.logprobs for p in params]
        wanted = any(k is not None for k in want_logprobs)
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if wanted else None
        if logits.is_cuda and sample_tokens is not None and all(_plain(seq) for seq in seqs):
            # temperature only: one fused pass over the model's logits
            if all(p.greedy for p in params):  # no copy to the device for the common all-greedy batch
                inv_t = self._zeros(len(params), logits.device)
            else:
                inv_t = to_device([0.0 if p.greedy else 1.0 / p.temperature for p in params], torch.float32,
                                  logits.device)
            chosen = sample_tokens(logits, inv_t, int(torch.randint(2**62, ()).item()))  # a CPU draw: no wait
        else:
            logits = self._process(logits.float(), seqs)
            chosen = logits.argmax(dim=-1) if all(p.greedy for p in params) else self._sample(logits, seqs)
        if raw_logprobs is None:
            return PendingSample(chosen, (), None)
        return PendingSample(chosen, _logprob_tensors(raw_logprobs, chosen, want_logprobs), want_logprobs)

    def _process(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        for row, seq in enumerate(seqs):
            p = seq.params
            if p.needs_penalties:
                _apply_penalties(logits[row], seq)
            if p.logit_bias:  # keys were checked against the vocabulary at submit time
                ids = to_device(list(p.logit_bias), torch.long, logits.device)
                bias = to_device(list(p.logit_bias.values()), logits.dtype, logits.device)
                logits[row].index_add_(0, ids, bias)
            if _min_tokens_active(seq):
                ids = to_device([t for t in seq.stop_ids if t < logits.shape[1]], torch.long, logits.device)
                logits[row].index_fill_(0, ids, float("-inf"))
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        device = logits.device
        greedy = to_device([p.greedy for p in params], torch.bool, device)
        greedy_ids = logits.argmax(dim=-1)
        temps = to_device([1.0 if p.greedy else p.temperature for p in params], torch.float32, device)
        logits = logits / temps[:, None]
        top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
        top_p = [p.top_p for p in params]
        if any(top_k) or any(x < 1.0 for x in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        min_p = [p.min_p for p in params]
        if any(min_p):
            threshold = to_device(min_p, torch.float32, device)[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        q = torch.empty_like(probs).exponential_()
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                q[row].exponential_(generator=seq.generator)
        sampled = (probs / q).argmax(dim=-1)
        return torch.where(greedy, greedy_ids, sampled)


def _plain(seq: Sequence) -> bool:
    """Whether a row needs nothing but its temperature (and draws from the shared generator)."""
    p = seq.params
    return not (p.needs_penalties or p.logit_bias or _min_tokens_active(seq) or seq.generator is not None
                or p.top_k > 0 or p.top_p < 1.0 or p.min_p)


def _min_tokens_active(seq: Sequence) -> bool:
    """Whether stop tokens are still banned: fewer than min_tokens sampled (pending ones count)."""
    return seq.num_sampled < seq.params.min_tokens and bool(seq.stop_ids)


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    """Repetition penalty over prompt and output tokens; presence and frequency over output tokens (vLLM's).
    Every token id is inside the vocabulary: prompts are checked at submit time, outputs are sampled."""
    p = seq.params
    device = row.device
    if p.repetition_penalty != 1.0:
        seen = torch.zeros(row.shape[0], dtype=torch.bool, device=device)
        seen[to_device(seq.token_ids, torch.long, device)] = True
        penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        row.copy_(torch.where(seen, penalized, row))
    out = seq.output_token_ids
    if out and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(to_device(out, torch.long, device), minlength=row.shape[0]).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = to_device([x if x > 0 else vocab for x in top_k], torch.long, logits.device)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # drop a token when the tokens ranked above it already reach top_p (the first token always stays)
    before = probs.cumsum(dim=-1) - probs
    drop |= before >= to_device(top_p, torch.float32, logits.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _logprob_tensors(raw: torch.Tensor, chosen: torch.Tensor, want: list[int | None]) -> tuple[torch.Tensor, ...]:
    """(top logprobs, their ids, the chosen token's logprob, its rank) for every row, to the widest k asked."""
    k = max(x or 0 for x in want)
    chosen_lp = raw.gather(-1, chosen[:, None]).squeeze(-1)
    ranks = (raw > chosen_lp[:, None]).sum(dim=-1) + 1
    top_lp, top_ids = raw.topk(k, dim=-1) if k else (raw[:, :0], chosen[:, None][:, :0])
    return top_lp, top_ids, chosen_lp, ranks


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on the device without waiting for it: a plain copy to CUDA would wait for the whole
    stream, a pinned non-blocking one does not."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)

