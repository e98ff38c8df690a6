"""The one-row GEMV kernel on CUDA at Llama-3.1-8B's and Qwen3-0.6B's projection shapes in bf16, against an fp32
matmul of the same bf16 values: as close as cuBLAS's bf16 result is."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.gemv import gemv

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
