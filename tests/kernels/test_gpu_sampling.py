"""The fused sampling kernel on CUDA at real shapes (batch 256, Qwen3's 151,936-token vocabulary, bf16): greedy
rows equal torch.argmax, and random rows follow softmax(logits / T) over a vocabulary where a few tokens carry
most of the mass."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.sampling import sample_tokens

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BATCH, VOCAB = 256, 151936


def test_greedy_rows_equal_argmax_at_real_shape():
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(BATCH, VOCAB, device="cuda", generator=gen).to(torch.bfloat16) * 4
    chosen = sample_tokens(logits, torch.zeros(BATCH, device="cuda"), seed=1)
    assert torch.equal(chosen, logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_random_rows_follow_the_tempered_softmax(temperature):
    logits = torch.full((BATCH, VOCAB), -30.0, device="cuda")
    heads = torch.tensor([1.0, 0.5, 0.0, -1.0], device="cuda")
    ids = torch.tensor([7, 50_000, 100_000, VOCAB - 1], device="cuda")  # in different chunks
    logits[:, ids] = heads
    probs = torch.softmax(logits[0] / temperature, dim=-1)[ids].double()
    counts = torch.zeros(len(ids), dtype=torch.float64, device="cuda")
    draws = 0
    for seed in range(40):
        chosen = sample_tokens(logits.to(torch.bfloat16), torch.full((BATCH,), 1 / temperature, device="cuda"), seed)
        counts += (chosen[:, None] == ids[None, :]).sum(0).double()
        draws += BATCH
    assert counts.sum() == draws  # the tail at -30 holds ~1e-8 of the mass: never drawn
    freq = counts / draws
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert ((freq - probs).abs() <= 4.5 * sigma).all(), (freq.tolist(), probs.tolist())
