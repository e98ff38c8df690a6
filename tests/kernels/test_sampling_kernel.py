"""The fused sampling kernel on the CPU under Triton's interpreter (tests/kernels/conftest.py switches it on).

Each program costs the interpreter ~10 ms (greedy) to ~20 ms (random: Philox), whatever its size, so vocabularies
are tiny and small `chunk`s make them span several programs, quarters and chunk boundaries. Draws are
deterministic for a seed, so the statistical checks give the same answer on every run; their bounds are ~3.5-4.5
standard errors, and the distribution test shows on the same draws that a halved or doubled temperature is
rejected."""

from __future__ import annotations

import math

import pytest
import torch

from engine.kernels.sampling import sample_tokens

INF = float("inf")


def greedy(batch: int) -> torch.Tensor:
    return torch.zeros(batch, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_torch_argmax_with_first_index_ties(dtype):
    gen = torch.Generator().manual_seed(0)
    vocab = 50  # chunk 16: chunks [0, 16) ... [48, 50), quarters of 4
    logits = torch.randn(7, vocab, generator=gen)
    logits[0, [15, 16]] = 9.0  # tie across a chunk boundary
    logits[1, [3, 4, 40]] = 9.0  # across a quarter boundary, and a later chunk
    logits[2, [17, 49]] = 9.0  # in the last, ragged chunk
    logits[3, :30] = -INF  # the max among the rest, and ties in it
    logits[3, [31, 45]] = 7.0
    logits[4] = -INF  # torch gives 0
    logits[5] = 1.0  # all equal: 0
    logits[6] = torch.randint(-2, 3, (vocab,), generator=gen).float()  # many ties
    logits[6, :20] = -INF
    wide = torch.zeros(7, vocab + 20, dtype=dtype)
    wide[:, 5 : 5 + vocab] = logits.to(dtype)
    logits = wide[:, 5 : 5 + vocab]  # rows strided by 70
    expected = logits.argmax(dim=1)
    assert expected.tolist()[:6] == [15, 3, 17, 31, 0, 0]
    got = sample_tokens(logits, greedy(7), seed=1, chunk=16)
    assert got.dtype == torch.int64 and got.tolist() == expected.tolist()


def test_greedy_default_chunk_and_many_chunks():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 3000, generator=gen).to(torch.bfloat16)  # bf16 ties among 3000 values
    logits[1, [255, 256, 2999]] = 30.0
    logits[2, [1000, 2047, 2048]] = 30.0
    for chunk in (4096, 256):
        assert sample_tokens(logits, greedy(3), seed=0, chunk=chunk).tolist() == logits.argmax(1).tolist()
    assert sample_tokens(logits, greedy(3), seed=0).tolist()[1:] == [255, 1000]


def test_random_rows_follow_tempered_softmax():
    """Identical rows (row stride 0), alternately at inv_temperature 1 and 2, each draw once: the empirical law of
    each group must be softmax(logits * its inv_t). The mean drawn logit is the sufficient statistic of the
    temperature: it lands within 3.5 standard errors of its value at inv_t and outside them at inv_t / 2 and
    inv_t * 2 (these logits set those apart by more than 3.5 standard errors of each side, so a sample passing the
    first check passes the second). Every token's frequency is checked too."""
    n = 160  # draws per temperature
    row = torch.tensor([3.0, -0.5, 2.0, -INF, -0.5, 2.0, -1.0, -0.5])
    finite = row.double().nan_to_num(neginf=0.0)
    inv_temps = (1.0, 2.0)
    all_tokens = sample_tokens(row.expand(2 * n, 8), torch.tensor(inv_temps).repeat(n), seed=1234, chunk=8)
    assert not torch.isinf(row[all_tokens]).any()

    def law(t: float) -> tuple[torch.Tensor, float, float]:
        p = torch.softmax(row.double() * t, 0)
        mean = (p * finite).sum().item()
        return p, mean, math.sqrt((p * (finite - mean) ** 2).sum().item() / n)

    for i, inv_t in enumerate(inv_temps):
        tokens = all_tokens[i::2]
        drawn_mean = finite[tokens].mean().item()
        p, mean, se = law(inv_t)
        assert abs(drawn_mean - mean) < 3.5 * se, (inv_t, drawn_mean, mean, se)
        for wrong in (inv_t / 2, inv_t * 2):
            _, wrong_mean, wrong_se = law(wrong)
            assert abs(drawn_mean - wrong_mean) > 3.5 * wrong_se, (inv_t, wrong, drawn_mean, wrong_mean)
        counts = torch.bincount(tokens, minlength=8).double()
        bound = 4.5 * (n * p * (1 - p)).sqrt() + 1
        assert ((counts - n * p).abs() <= bound).all(), (inv_t, counts.tolist(), (n * p).tolist())


def test_rows_draw_independently_and_seed_decides():
    """A flat law over 64 tokens in 2 chunks: rows draw different tokens from both chunks (their Philox counters
    differ), the same seed repeats every draw, and another seed (also one differing only in its high bits)
    changes nearly all of them."""
    batch = 16
    logits = torch.zeros(batch, 64)
    inv_temp = torch.ones(batch)
    first = sample_tokens(logits, inv_temp, seed=42, chunk=32)
    assert len(set(first.tolist())) >= 12
    assert (first < 32).any() and (first >= 32).any()
    assert sample_tokens(logits, inv_temp, seed=42, chunk=32).tolist() == first.tolist()
    for other in (43, 42 + 2**40, -42):
        same = (sample_tokens(logits, inv_temp, seed=other, chunk=32) == first).sum().item()
        assert same <= 3, (other, same)  # 16 / 64 expected


def test_mixed_batch():
    """Greedy rows stay exact next to random ones; random rows never draw -inf, even at a high temperature, always
    draw a lone +inf, and a row of only -inf gives 0."""
    vocab = 40  # chunk 8: 5 chunks, quarters of 2
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(8, vocab, generator=gen)
    logits[0, [7, 8]] = 5.0  # greedy: tie across a chunk boundary
    logits[2, :] = -INF
    logits[2, [3, 17, 30, 39]] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # random: only these may be drawn
    logits[3, :] = -INF  # random, all -inf: 0
    logits[4, :] = -INF  # greedy, all -inf: 0
    logits[5, 33] = INF  # random: +inf always wins
    logits[6, :21] = -INF  # greedy
    logits[7, :] = -INF
    logits[7, [9, 25]] = 0.0
    inv_temp = torch.tensor([0.0, 0.5, 0.01, 1.0, 0.0, 1.0, 0.0, 0.01])
    random_rows = inv_temp > 0
    for seed in (5, 6):
        got = sample_tokens(logits.to(torch.bfloat16), inv_temp, seed=seed, chunk=8)
        expected = logits.to(torch.bfloat16).argmax(1)
        assert got[~random_rows].tolist() == expected[~random_rows].tolist()
        assert got[2].item() in (3, 17, 30, 39) and got[7].item() in (9, 25)
        assert got[3].item() == 0 and got[5].item() == 33
        assert 0 <= got[1].item() < vocab


def test_empty_batch():
    out = sample_tokens(torch.zeros(0, 10), torch.zeros(0), seed=0)
    assert out.dtype == torch.int64 and out.shape == (0,)


@pytest.mark.parametrize("logits, inv_temp, kwargs, match", [
    (torch.zeros(10), torch.zeros(1), {}, "logits must be 2-D"),
    (torch.zeros(2, 3, 4), torch.zeros(2), {}, "logits must be 2-D"),
    (torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2), {}, "logits must be float32"),
    (torch.zeros(4, 2).t(), torch.zeros(2), {}, "logits needs a non-empty, contiguous last dim"),
    (torch.zeros(2, 0), torch.zeros(2), {}, "logits needs a non-empty"),
    (torch.zeros(2, 4), torch.zeros(3), {}, "inv_temperature must be float32 of shape"),
    (torch.zeros(2, 4), torch.zeros(2, 1), {}, "inv_temperature must be float32 of shape"),
    (torch.zeros(2, 4), torch.zeros(2, dtype=torch.float64), {}, "inv_temperature must be float32"),
    (torch.zeros(2, 4), torch.zeros(2, device="meta"), {}, "inv_temperature is on meta"),
    (torch.zeros(2, 4), torch.zeros(2), {"seed": 1.5}, "seed must be an int"),
    (torch.zeros(2, 4), torch.zeros(2), {"chunk": 24}, "chunk must be a power of two"),
    (torch.zeros(2, 4), torch.zeros(2), {"chunk": 2}, "chunk must be a power of two"),
])
def test_bad_input(logits, inv_temp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_tokens(logits, inv_temp, **{"seed": 0, **kwargs})
