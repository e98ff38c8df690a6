"""The RMSNorm kernel (with and without the residual add) against the eager ops it replaces, on the CPU under
Triton's interpreter: to 1e-6 in fp32, and bit for bit in bf16 on values whose squares sum exactly in any order
(multiples of 1/16), where only the rounding of each intermediate can differ."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.rms_norm import rms_norm
from engine.layers import ops


def inputs(rows, n, dtype, grid, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if grid:
        x, res = (torch.randint(-63, 64, (rows, n), generator=gen) / 16 for _ in range(2))
    else:
        x, res = torch.randn(rows, n, generator=gen) * 3, torch.randn(rows, n, generator=gen)
    weight = 1 + 0.3 * torch.randn(n, generator=gen)
    return x.to(dtype), res.to(dtype), weight.to(dtype)


@pytest.mark.parametrize("n", [64, 100, 1024])
@pytest.mark.parametrize("dtype,grid", [(torch.float32, False), (torch.bfloat16, True)])
def test_matches_eager_ops(n, dtype, grid):
    x, res, weight = inputs(5, n, dtype, grid, seed=n)
    exact = dtype != torch.float32

    def same(got, expected):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        if exact:
            assert torch.equal(got, expected), f"{(got != expected).sum().item()} of {got.numel()} differ"
        else:
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)

    same(rms_norm(x, weight, 1e-6), ops.rms_norm(x, weight, 1e-6))
    got, got_residual = rms_norm(x, weight, 1e-6, residual=res)
    expected, expected_residual = ops.add_rms_norm(x, res, weight, 1e-6)
    same(got, expected)
    assert torch.equal(got_residual, expected_residual)


def test_eps_counts_and_row_strides_are_followed():
    wide = torch.randn(4, 96) * 1e-3
    x, weight = wide[:, :64], torch.ones(64)  # rows 96 apart
    torch.testing.assert_close(rms_norm(x, weight, 1e-2), ops.rms_norm(x, weight, 1e-2), atol=1e-6, rtol=1e-6)


def test_no_rows():
    out, residual = rms_norm(torch.zeros(0, 8), torch.ones(8), 1e-6, residual=torch.zeros(0, 8))
    assert out.shape == residual.shape == (0, 8)


@pytest.mark.parametrize("x,weight,residual,field", [
    (torch.zeros(8), torch.ones(8), None, "x"),
    (torch.zeros(2, 8), torch.ones(7), None, "weight"),
    (torch.zeros(2, 8), torch.ones(8, dtype=torch.float64), None, "weight"),
    (torch.zeros(2, 8), torch.ones(8), torch.zeros(3, 8), "residual"),
])
def test_bad_inputs_name_the_argument(x, weight, residual, field):
    with pytest.raises(ValueError, match=field):
        rms_norm(x, weight, 1e-6, residual=residual)
