"""Sampling for a batch of rows: penalties, logit bias, banned tokens, temperature, top-k/top-p/min-p.

The sampler takes tensors (SamplingTensors, built by the model runner from the step's rows), never request state.
Logprobs are those of the model's raw distribution (log_softmax of the logits), as vLLM returns by default.
Random draws use the exponential race (argmax of p / q with q ~ Exp(1)), which equals sampling from p; rows of
seeded requests draw q from their own generator, so their tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

try:  # the fused CUDA path; without triton every row takes the torch path
    from engine.kernels.sampling import sample_tokens
except ImportError:  # pragma: no cover
    sample_tokens = None


@dataclass
class LogitEdits:
    """What one row changes in its logits before sampling (vLLM's penalties, logit_bias, min_tokens' ban)."""
    row: int
    seen_ids: torch.Tensor | None = None  # prompt and output tokens, for the repetition penalty
    repetition_penalty: float = 1.0
    output_ids: torch.Tensor | None = None  # output tokens, for the presence and frequency penalties
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    banned_ids: torch.Tensor | None = None  # set to -inf (stop tokens before min_tokens)


@dataclass
class SamplingTensors:
    """One step's sampling, one entry per sampled row. `plain` rows need nothing but a temperature: then only
    inv_temperature is filled (None: every row greedy) and a fused kernel may take the whole batch; otherwise
    temperature, greedy and the filters are filled."""
    num_rows: int
    all_greedy: bool
    plain: bool
    inv_temperature: torch.Tensor | None = None  # [R] float32, 0 for greedy rows
    temperature: torch.Tensor | None = None  # [R] float32, 1 for greedy rows
    greedy: torch.Tensor | None = None  # [R] bool
    top_k: torch.Tensor | None = None  # [R] int64, vocab size for no limit; None: no row limits
    top_p: torch.Tensor | None = None  # [R] float32; None: no row limits
    min_p: torch.Tensor | None = None  # [R] float32; None: no row limits
    generators: list[torch.Generator | None] = field(default_factory=list)  # a seeded row's own
    edits: list[LogitEdits] = field(default_factory=list)
    logprobs: list[int | None] | None = None  # alternatives each row wants; None: no row wants logprobs


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
    """Draws from the runner's generators: `device` for the noise of unseeded rows, `host` for the fused
    kernel's seed (drawn on the host, so nothing waits for the device)."""

    def __init__(self, device: torch.Generator, host: torch.Generator) -> None:
        self.device_generator, self.host_generator = device, host
        self._zero_buffer: torch.Tensor | None = None

    def _zeros(self, n: int, device: torch.device) -> torch.Tensor:
        """n float32 zeros on the device (greedy inverse temperatures), from a buffer that is never written."""
        if self._zero_buffer is None or self._zero_buffer.numel() < n or self._zero_buffer.device != device:
            self._zero_buffer = torch.zeros(max(n, 256), dtype=torch.float32, device=device)
        return self._zero_buffer[:n]

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, tensors: SamplingTensors) -> SamplerOutput:
        return self.sample(logits, tensors).result()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, t: SamplingTensors, bitmask: torch.Tensor | None = None) -> PendingSample:
        """Launch the sampling of one token per row; nothing waits for the device here. bitmask (int32 [rows,
        words], bit set = allowed) restricts each row's tokens (structured output); logprobs stay the model's."""
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if t.logprobs is not None else None
        if bitmask is not None:
            apply_bitmask(logits, bitmask)
        if t.plain and logits.is_cuda and sample_tokens is not None:  # one fused pass over the model's logits
            inv_t = t.inv_temperature if t.inv_temperature is not None else self._zeros(t.num_rows, logits.device)
            seed = int(torch.randint(2**62, (), generator=self.host_generator))
            chosen = sample_tokens(logits, inv_t, seed)
        else:
            logits = _edit(logits.float(), t.edits)
            chosen = logits.argmax(dim=-1) if t.all_greedy else self._sample(logits, t)
        if raw_logprobs is None:
            return PendingSample(chosen, (), None)
        return PendingSample(chosen, _logprob_tensors(raw_logprobs, chosen, t.logprobs), t.logprobs)

    def _sample(self, logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        greedy_ids = logits.argmax(dim=-1)
        if t.temperature is not None:
            logits = logits / t.temperature[:, None]
        if t.top_k is not None or t.top_p is not None:
            logits = _top_k_top_p(logits, t.top_k, t.top_p)
        probs = torch.softmax(logits, dim=-1)
        if t.min_p is not None:
            probs = probs.masked_fill(probs < t.min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        q = torch.empty_like(probs).exponential_(generator=self.device_generator)
        for row, generator in enumerate(t.generators):
            if generator is not None:
                q[row].exponential_(generator=generator)
        sampled = (probs / q).argmax(dim=-1)
        return sampled if t.greedy is None else torch.where(t.greedy, greedy_ids, sampled)


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """Set the logits of disallowed tokens to -inf, in place."""
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((mask[:, :, None] >> shifts) & 1).bool().flatten(1)[:, : logits.shape[-1]]
    logits.masked_fill_(~allowed, float("-inf"))


def _edit(logits: torch.Tensor, edits: list[LogitEdits]) -> torch.Tensor:
    for e in edits:
        row = logits[e.row]
        if e.seen_ids is not None:
            apply_repetition_penalty(row, e.seen_ids, e.repetition_penalty)
        if e.output_ids is not None:
            apply_count_penalties(row, e.output_ids, e.presence_penalty, e.frequency_penalty)
        if e.bias_ids is not None:
            row.index_add_(0, e.bias_ids, e.bias_values.to(row.dtype))
        if e.banned_ids is not None:
            row.index_fill_(0, e.banned_ids, float("-inf"))
    return logits


def apply_repetition_penalty(row: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> None:
    """vLLM's (and transformers'): every token seen in the prompt or output, once however often."""
    seen = torch.zeros(row.shape[0], dtype=torch.bool, device=row.device)
    seen[seen_ids] = True
    penalized = torch.where(row > 0, row / penalty, row * penalty)
    row.copy_(torch.where(seen, penalized, row))


def apply_count_penalties(row: torch.Tensor, output_ids: torch.Tensor, presence: float, frequency: float) -> None:
    """OpenAI's presence and frequency penalties, over output tokens."""
    counts = torch.bincount(output_ids, minlength=row.shape[0]).to(row.dtype)
    row -= frequency * counts + presence * (counts > 0).to(row.dtype)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """top_k [R] (the vocabulary size for no limit) and top_p [R]; either may be None."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = ranks >= top_k[:, None] if top_k is not None else torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_p is not None:
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first token always stays)
        before = probs.cumsum(dim=-1) - probs
        drop |= before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _logprob_tensors(raw: torch.Tensor, chosen: torch.Tensor, want: list[int | None]) -> tuple[torch.Tensor, ...]:
    """(top logprobs, their ids, the chosen token's logprob, its rank) for every row, to the widest k asked."""
    k = max(x or 0 for x in want)
    chosen_lp = raw.gather(-1, chosen[:, None]).squeeze(-1)
    ranks = (raw > chosen_lp[:, None]).sum(dim=-1) + 1
    top_lp, top_ids = raw.topk(k, dim=-1) if k else (raw[:, :0], chosen[:, None][:, :0])
    return top_lp, top_ids, chosen_lp, ranks
