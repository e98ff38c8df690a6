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


@pytest.mark.parametrize("graph", [False, True])
def test_chained_gemvs_read_the_previous_kernels_output(graph):
    """Each GEMV reads the vector the kernel just before it wrote. Launched as dependents (PDL, on Hopper), they
    start before that kernel ends: a missing wait would read a stale or half-written vector."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [(torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).to(torch.bfloat16)
               for n, k in [(14336, 4096), (4096, 14336)] * 4]
    x = torch.randn(1, 4096, device="cuda", generator=gen).to(torch.bfloat16)

    def chain(v, matmul):
        for i, w in enumerate(weights):  # GEMV after GEMV (which lets its dependent start early), or a torch op
            v = matmul(v * 1.5 if i % 2 else v, w)
        return v

    expected = chain(x, lambda v, w: F.linear(v.float(), w.float()).to(torch.bfloat16))
    if graph:
        chain(x, gemv)  # compile outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = chain(x, gemv)
        x.copy_(x * -1)  # new input: a graph reading stale values would give the old answer
        expected = chain(x, lambda v, w: F.linear(v.float(), w.float()).to(torch.bfloat16))
        g.replay()
    else:
        out = chain(x, gemv)
    torch.cuda.synchronize()
    # bf16 roundings add up to about 1% over the chain; a stale or partly written input gives about 100%
    assert (out.float() - expected.float()).norm() <= 0.05 * expected.float().norm()
