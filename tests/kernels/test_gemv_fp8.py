"""The GEMV kernel's FP8 variant (e4m3 weights, a float32 scale per row) on the CPU under Triton's interpreter,
against the dequantized torch reference, at shapes that take each tile choice, ragged ones included. The
interpreter converts every finite e4m3 value exactly (checked below), so fp32 results differ from the reference
by the summation order only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.fp8 import dequantize_fp8, fp8_linear_reference, quantize_fp8
from engine.kernels.activation import silu_and_mul
from engine.kernels.gemv import gemv, gemv_rows, gemv_swiglu


def fp8_weight(n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.linspace(0.01, 2.0, n).reshape(-1, 1)  # scales differ per row
    return quantize_fp8(w)


def test_interpreter_reads_every_finite_e4m3_value_exactly():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = codes[~codes.float().isnan()]  # 0x7f and 0xff are NaN, which quantize_fp8 never writes
    weight = finite.reshape(-1, 2)[:, :1].contiguous()  # 127 one-column rows
    x = torch.ones(1, 1)
    assert torch.equal(gemv(x, weight, weight_scale=torch.ones(weight.shape[0])), weight.float().T)


@pytest.mark.parametrize("n,k", [(64, 512), (40, 1024), (16, 4096), (26, 768), (24, 700), (3, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_gemv_matches_the_dequantized_reference(n, k, with_bias):
    q, scale = fp8_weight(n, k, n * 31 + k)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(1, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    out = gemv(x, q, bias, weight_scale=scale)
    torch.testing.assert_close(out, fp8_linear_reference(x, q, scale, bias), atol=1e-4, rtol=1e-4)


def test_fp8_gemv_with_bf16_activations():
    q, scale = fp8_weight(32, 512, 1)
    x = torch.randn(1, 512).to(torch.bfloat16)
    out = gemv(x, q, weight_scale=scale)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x.float(), dequantize_fp8(q, scale)), atol=0.05, rtol=0.02)


def test_fp8_gemv_reads_weight_rows_through_their_stride():
    q, scale = fp8_weight(48, 600, 2)
    weight = q[:, :512]  # rows contiguous, row stride 600
    x = torch.randn(1, 512)
    torch.testing.assert_close(gemv(x, weight, weight_scale=scale), F.linear(x, dequantize_fp8(weight, scale)),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scale", [torch.ones(8, dtype=torch.float64), torch.ones(4), torch.ones(8, 1)])
def test_bad_weight_scale_is_named(scale):
    q, _ = fp8_weight(8, 16, 3)
    with pytest.raises(ValueError, match="weight_scale"):
        gemv(torch.zeros(1, 16), q, weight_scale=scale)


@pytest.mark.parametrize("inter,k", [(64, 512), (64, 2048), (18, 256), (24, 700)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemv_swiglu_equals_the_unfused_pair(inter, k, dtype):
    """Gate and up rows have scales of their own (the up half's follow the gate half's); the fused kernel gives
    gemv-then-silu_and_mul's bits (the last shape takes the fallback) and the dequantized reference's values."""
    q, scale = fp8_weight(2 * inter, k, inter + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(inter)).to(dtype)
    fused = gemv_swiglu(x, q, weight_scale=scale)
    assert fused.shape == (1, inter) and fused.dtype == dtype
    assert torch.equal(fused, silu_and_mul(gemv(x, q, weight_scale=scale)))
    deq = dequantize_fp8(q, scale, torch.float64)
    exact = F.silu(F.linear(x.double(), deq[:inter])) * F.linear(x.double(), deq[inter:])
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(fused.double(), exact, atol=tol * exact.abs().max().item(), rtol=tol)


def test_bf16_gemv_unchanged_without_a_scale():
    """No weight_scale: the plain kernel (HAS_SCALE off), bit for bit what it gave before FP8 existed."""
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(1, 512, generator=gen), torch.randn(64, 512, generator=gen)
    assert torch.equal(gemv(x, w), gemv(x, w, weight_scale=None))
    assert torch.equal(gemv(x, w, weight_scale=torch.ones(64)), gemv(x, w))  # scale 1: the same arithmetic


@pytest.mark.parametrize("m,n,k", [(2, 64, 256), (5, 100, 300), (16, 128, 512), (1, 70, 130)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_rows_fp8_matches_the_dequantized_reference(m, n, k, with_bias):
    q, scale = fp8_weight(n, k, m * n + k)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    out = gemv_rows(x, q, bias, weight_scale=scale)
    assert out.shape == (m, n) and out.dtype == x.dtype
    torch.testing.assert_close(out, fp8_linear_reference(x, q, scale, bias), atol=1e-4, rtol=1e-4)


def test_gemv_rows_takes_plain_weights_and_bf16_rows():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 256, generator=gen), torch.randn(48, 256, generator=gen)
    torch.testing.assert_close(gemv_rows(x, w), F.linear(x, w), atol=1e-4, rtol=1e-4)
    q, scale = fp8_weight(48, 256, 4)
    xb = x.to(torch.bfloat16)
    out = gemv_rows(xb, q, weight_scale=scale)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fp8_linear_reference(xb.float(), q, scale), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("x_shape,field", [((17, 8), "x"), ((0, 8), "x"), ((2, 9), "weight")])
def test_gemv_rows_bad_shapes_name_the_argument(x_shape, field):
    with pytest.raises(ValueError, match=field):
        gemv_rows(torch.zeros(x_shape), torch.zeros(4, 8))
