"""Sampler and SamplingParams in isolation: penalty, top-k/top-p, min_tokens, bias, logprob and seed handling
on small logits, and validation messages that name the field."""

from __future__ import annotations

import math

import pytest
import torch

from engine import SamplingParams
from engine.layers import sampler as sampler_mod
from engine.sampling_inputs import sampling_tensors
from engine.scheduler import ScheduledRequest

EOS = 0
CPU = torch.device("cpu")


def _row(prompt, output, generator=None, **kw) -> ScheduledRequest:
    """A sampled row after `output` tokens of `prompt`."""
    params = SamplingParams(**kw)
    params.eos_token_ids = [EOS]
    tokens = list(prompt) + list(output)
    return ScheduledRequest("r", tokens, len(tokens) - 1, 1, [0], True, params, generator, len(prompt), len(output))


def _sampler() -> sampler_mod.Sampler:
    return sampler_mod.Sampler(torch.Generator().manual_seed(0), torch.Generator().manual_seed(0))


def _edited(logits, row):
    return sampler_mod._edit(logits[None].clone(), sampling_tensors([row], CPU, logits.shape[0]).edits)[0]


def test_apply_penalties_unit():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, -1.0, 3.0])
    row = _row([0, 1], [2, 2, 3], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # 0, 1: prompt only (repetition); 2: twice in output; 3: once; 4, 5: untouched
    expected = torch.tensor([1.0, -4.0, 0.5 - 1.0 - 0.25, 0.25 - 0.5 - 0.25, -1.0, 3.0])
    torch.testing.assert_close(_edited(logits, row), expected)

    # presence/frequency ignore prompt tokens; repetition counts a token once however often it appears
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    row = _row([0, 0, 0, 1], [3, 3], repetition_penalty=1.0, frequency_penalty=1.0, presence_penalty=1.0)
    torch.testing.assert_close(_edited(logits, row), torch.tensor([2.0, -2.0, 1.0, 0.5 - 2.0 - 1.0]))


def test_a_plain_batch_builds_only_inverse_temperatures():
    rows = [_row([1], [], temperature=0), _row([1], [], temperature=0.5)]
    t = sampling_tensors(rows, CPU, 8)
    assert t.plain and not t.all_greedy and t.inv_temperature.tolist() == [0.0, 2.0]
    assert t.temperature is None and t.edits == [] and t.logprobs is None
    assert sampling_tensors(rows[:1], CPU, 8).inv_temperature is None  # all greedy: nothing to copy
    t = sampling_tensors([rows[0], _row([1], [], temperature=0.5, top_k=2, logprobs=1)], CPU, 8)
    assert not t.plain and t.top_k.tolist() == [8, 2] and t.top_p is None and t.logprobs == [None, 1]


def test_top_k_top_p_unit():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 10.0]])
    out = sampler_mod._top_k_top_p(logits.clone(), torch.tensor([2, 4, 4]), torch.tensor([1.0, 0.7, 0.5]))
    inf = -math.inf
    # row 0: top-2 keeps 3 and 2; row 1: probs .64 .09 .24 .03 -> .64 < .7 so the second (2.0) stays, then
    # .88 >= .7 drops the rest; row 2: one dominant token
    torch.testing.assert_close(out, torch.tensor([[3.0, inf, 2.0, inf], [3.0, inf, 2.0, inf],
                                                  [inf, inf, inf, 10.0]]))


def test_sampler_unit_min_tokens_bias_and_logprobs():
    logits = torch.tensor([[5.0, 1.0, 2.0, 0.0, -1.0]] * 3)
    rows = [_row([1], [], temperature=0, min_tokens=2),  # EOS (0) masked: picks 2
            _row([1], [4, 4], temperature=0, min_tokens=2),  # min_tokens reached: EOS allowed
            _row([1], [], temperature=0, logit_bias={3: 10.0}, logprobs=2)]
    out = _sampler()(logits.clone(), sampling_tensors(rows, CPU, 5))
    assert out.token_ids == [2, 0, 3]
    raw = torch.log_softmax(logits[2], -1)
    top_ids, top_lps, chosen_lp, rank = out.logprobs[2]
    assert top_ids == [0, 2] and rank == 4  # logprobs are of the raw logits: bias and min_tokens don't count
    assert chosen_lp == pytest.approx(raw[3].item()) and top_lps == pytest.approx(raw[[0, 2]].tolist())
    assert out.logprobs[0] is None and out.logprobs[1] is None


def test_sampler_unit_seeded_rows_ignore_the_batch():
    sampler = _sampler()
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))

    def run(batch_size, seeded):
        rows = [_row([1], [], temperature=1.0) for _ in range(batch_size)]
        rows[seeded] = _row([1], [], torch.Generator().manual_seed(9), temperature=1.0, seed=9)
        return [sampler(logits.repeat(batch_size, 1), sampling_tensors(rows, CPU, 50)).token_ids[seeded]
                for _ in range(20)]

    assert run(1, 0) == run(6, 4)


# ---------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 1.5), ("temperature", -1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("top_k", -2), ("top_k", 2.0), ("min_p", 2),
    ("min_p", -0.1), ("max_tokens", 0), ("max_tokens", True), ("min_tokens", -1), ("stop", [""]),
    ("stop", [1]), ("stop_token_ids", [-1]), ("presence_penalty", 3), ("frequency_penalty", -2.5),
    ("repetition_penalty", 0), ("repetition_penalty", -1), ("logprobs", 21), ("logprobs", -1),
    ("seed", 2**64), ("seed", 1.0), ("logit_bias", {"x": 1}), ("logit_bias", {-1: 1}), ("logit_bias", {5: 1000}),
    ("logit_bias", {5: float("nan")}),
], ids=lambda v: repr(v)[:20])
def test_invalid_sampling_params(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_valid_edge_sampling_params():
    SamplingParams(temperature=0, top_p=1.0, top_k=-1, min_p=1.0, seed=2**64 - 1, logprobs=20, max_tokens=None,
                   min_tokens=3, repetition_penalty=2.0, presence_penalty=-2.0)
    sp = SamplingParams(logit_bias={"5": 100, 7: -100.0}, stop="x")
    assert sp.logit_bias == {5: 100, 7: -100.0} and sp.stop == ["x"]
