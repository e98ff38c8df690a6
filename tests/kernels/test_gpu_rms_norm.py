"""The RMSNorm kernel on CUDA at real shapes in bf16 against the eager ops: bit for bit on values whose squares sum
exactly in any order, within one bf16 rounding of the normed value on normal values."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.rms_norm import rms_norm
from engine.layers import ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("rows,n", [(1, 4096), (256, 1024), (8192, 4096)])
@pytest.mark.parametrize("grid", [True, False])
def test_equals_eager(rows, n, grid):
    gen = torch.Generator(device="cuda").manual_seed(rows + n)
    if grid:  # multiples of 1/16: every sum of squares is exact
        x, res = (torch.randint(-63, 64, (rows, n), device="cuda", generator=gen) / 16 for _ in range(2))
    else:
        x, res = (torch.randn(rows, n, device="cuda", generator=gen) * 3 for _ in range(2))
    x, res = x.to(torch.bfloat16), res.to(torch.bfloat16)
    weight = (1 + 0.3 * torch.randn(n, device="cuda", generator=gen)).to(torch.bfloat16)
    got, got_residual = rms_norm(x, weight, 1e-6, residual=res)
    expected, expected_residual = ops.add_rms_norm(x, res, weight, 1e-6)
    assert torch.equal(got_residual, expected_residual)
    if grid:
        assert torch.equal(got, expected)
        assert torch.equal(rms_norm(x, weight, 1e-6), ops.rms_norm(x, weight, 1e-6))
    else:
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-3)
