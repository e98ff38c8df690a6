"""Benchmark workloads as docs/workloads.md defines them: random token-id prompts, ignore_eos, fixed or
per-request output lengths.

Every workload draws like nano-vllm's bench.py (seed 0; each prompt's length, then its tokens, randint(0, 10000);
then every output length), so `nano` holds exactly the prompts and lengths its published figures used, and
`nano-fixed` the same prompts (a fixed length draws nothing).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

Length = int | tuple[int, int]  # fixed, or uniform in [low, high] per request
_MAX_TOKEN_ID = 10000  # nano-vllm's randint(0, 10000)


@dataclass(frozen=True)
class Workload:
    name: str
    num_requests: int
    prompt_len: Length
    output_len: Length
    temperature: float = 0.0  # 0: greedy
    ttft: bool = False  # measures time to first token (median of repeated runs), not throughput


WORKLOADS = {
    "nano": Workload("nano", 256, (100, 1024), (100, 1024), temperature=0.6),
    # for peers that take one max_new_tokens for all requests
    "nano-fixed": Workload("nano-fixed", 256, (100, 1024), 512, temperature=0.6),
    # decode tokens/s of one request
    "bs1": Workload("bs1", 1, 128, 256),
    "ttft-8k": Workload("ttft-8k", 1, 8192, 1, ttft=True),
    # bs1's shape, 32 at once: what batching multiplies
    "batch32": Workload("batch32", 32, 128, 256),
}


@dataclass
class Requests:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_requests(workload: Workload, vocab_size: int, seed: int = 0) -> Requests:
    rng = random.Random(seed)
    high = min(_MAX_TOKEN_ID, vocab_size - 1)
    n = workload.num_requests
    # the length is drawn before the tokens of its prompt, as in nano-vllm's nested comprehension
    prompts = [[rng.randint(0, high) for _ in range(_draw(rng, workload.prompt_len))] for _ in range(n)]
    return Requests(prompts, [_draw(rng, workload.output_len) for _ in range(n)])


def shifted(prompts: list[list[int]], offset: int, vocab_size: int) -> list[list[int]]:
    """The prompts with every token id moved by offset: the same shapes, but nothing that the prefix cache holds
    from a warm-up or an earlier repeat, so a timed run's prefill is never free."""
    return [[(t + offset) % vocab_size for t in p] for p in prompts] if offset else prompts


def _draw(rng: random.Random, length: Length) -> int:
    return length if isinstance(length, int) else rng.randint(*length)
