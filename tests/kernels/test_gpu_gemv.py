"""The one-row GEMV kernel on CUDA at Llama-3.1-8B's and Qwen3-0.6B's projection shapes in bf16, against an fp32
matmul of the same bf16 values: as close as cuBLAS's bf16 result is."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.activation import silu_and_mul
from engine.kernels.gemv import gemv, gemv_swiglu

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096),
                                 (4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024)])
def test_gemv_is_as_close_to_fp32_as_cublas(n, k):
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16)
    weight = (torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).to(torch.bfloat16)
    exact = F.linear(x.float(), weight.float())
    ours = (gemv(x, weight).float() - exact).abs().max().item()
    cublas = (F.linear(x, weight).float() - exact).abs().max().item()
    assert ours <= max(2 * cublas, 1e-2), (ours, cublas)


@pytest.mark.parametrize("inter,k", [(14336, 4096), (3072, 1024)])
def test_gemv_swiglu_equals_the_unfused_pair(inter, k):
    """Llama-3.1-8B's and Qwen3-0.6B's MLP: the fused kernel gives the GEMV-then-activation result bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(inter)
    x = torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16)
    gate_up = (torch.randn(2 * inter, k, device="cuda", generator=gen) * k**-0.5).to(torch.bfloat16)
    assert torch.equal(gemv_swiglu(x, gate_up), silu_and_mul(gemv(x, gate_up)))
