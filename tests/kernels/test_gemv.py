"""The one-row GEMV kernel against F.linear, on the CPU under Triton's interpreter (fp32: only the summation
order differs), at shapes that take each of gemv_config's tile choices, ragged ones included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.activation import silu_and_mul
from engine.kernels.gemv import gemv, gemv_config, gemv_swiglu


@pytest.mark.parametrize("n,k", [(64, 512), (40, 1024), (16, 4096), (26, 768), (24, 700), (3, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_linear(n, k, with_bias):
    gen = torch.Generator().manual_seed(n * 31 + k)
    x = torch.randn(1, k, generator=gen)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    torch.testing.assert_close(gemv(x, weight, bias), F.linear(x, weight, bias), atol=1e-4, rtol=1e-4)


def test_gemv_reads_weight_rows_through_their_stride():
    wide = torch.randn(48, 600)
    weight = wide[:, :512]  # rows contiguous, row stride 600
    x = torch.randn(1, 512)
    torch.testing.assert_close(gemv(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-4)


def test_gemv_keeps_the_input_dtype():
    x, weight = torch.randn(1, 512).to(torch.bfloat16), torch.randn(32, 512).to(torch.bfloat16)
    out = gemv(x, weight)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x.float(), weight.float()), atol=0.1, rtol=0.02)


def test_configs_divide_the_benchmarked_shapes():
    """Llama-3.1-8B's projections take the unmasked path, in at least two K steps."""
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]:
        block_n, block_k = gemv_config(k)
        assert n % block_n == 0 and k % block_k == 0 and k // block_k >= 2


@pytest.mark.parametrize("x_shape,w_shape,bias_shape,field", [
    ((2, 8), (4, 8), None, "x"),
    ((1, 8), (4, 9), None, "weight"),
    ((1, 8), (4, 8), (5,), "bias"),
])
def test_bad_shapes_name_the_argument(x_shape, w_shape, bias_shape, field):
    bias = torch.zeros(bias_shape) if bias_shape else None
    with pytest.raises(ValueError, match=field):
        gemv(torch.zeros(x_shape), torch.zeros(w_shape), bias)



@pytest.mark.parametrize("inter,k", [(64, 512), (64, 2048), (18, 256), (24, 700)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_swiglu_equals_gemv_then_silu_and_mul(inter, k, dtype):
    """The fused gate-up GEMV and activation gives the unfused pair's bits (the last shape takes the fallback)."""
    gen = torch.Generator().manual_seed(inter + k)
    x = torch.randn(1, k, generator=gen).to(dtype)
    gate_up = (torch.randn(2 * inter, k, generator=gen) * k**-0.5).to(dtype)
    fused = gemv_swiglu(x, gate_up)
    assert fused.shape == (1, inter) and fused.dtype == dtype
    assert torch.equal(fused, silu_and_mul(gemv(x, gate_up)))
    exact = F.silu(F.linear(x.double(), gate_up[:inter].double())) * F.linear(x.double(), gate_up[inter:].double())
    torch.testing.assert_close(fused.double(), exact, atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=2e-2)
