"""Benchmark workloads (../shared/BENCHMARKS.md): random-token prompts, fixed output lengths, ignore_eos."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Workload:
    name: str
    num_requests: int
    prompt_len: int
    output_len: int


WORKLOADS = {
    # one request, 128-token prompt, 256 new tokens, greedy: decode tokens/s
    "bs1": Workload("bs1", 1, 128, 256),
    # the same shape, 32 at once: what batching multiplies
    "batch32": Workload("batch32", 32, 128, 256),
}


def make_prompts(workload: Workload, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(workload.prompt_len)] for _ in range(workload.num_requests)]
