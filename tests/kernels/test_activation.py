"""The SwiGLU activation kernel on the CPU under Triton's interpreter (tests/kernels/conftest.py switches it on),
against eager torch: bit for bit in bf16/fp16, where the kernel must round silu to the dtype before the product as
F.silu does. Widths of 1100 span two 1024-column blocks, the second ragged. The interpreter's own fp32 -> bf16 cast
truncates, so there the kernel rounds bf16 by hand: these tests check that, and where the kernel rounds, not the
GPU's cvt.rn (tests/kernels/test_gpu_activation.py does)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.activation import silu_and_mul

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's, at exp(100) etc.


def reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def inputs(rows: int, inter: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Normal values at scale 4, plus gates far enough out that exp(-gate) overflows or vanishes."""
    x = torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(seed)) * 4
    x[:, : min(inter, 3)] = torch.tensor([-100.0, 100.0, 0.0])[: min(inter, 3)]
    return x.to(dtype)


def check(x: torch.Tensor) -> None:
    """silu_and_mul(x) equals the reference, written first into a view of a buffer with a sentinel just past its
    end (a store past the end fails here, not as heap corruption in a later call), then into a fresh tensor."""
    expected = reference(x)
    buffer = torch.full((expected.numel() + 1,), 7.0, dtype=x.dtype)
    out = buffer[:-1].view(expected.shape)
    assert silu_and_mul(x, out=out) is out
    assert buffer[-1].item() == 7.0
    for got in (out, silu_and_mul(x)):
        assert got.shape == expected.shape and got.dtype == x.dtype and got.is_contiguous()
        if x.dtype == torch.float32:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, expected), f"{(got != expected).sum().item()} of {got.numel()} differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,inter", [(5, 1100), (1, 64), (3, 7)])
def test_matches_eager(dtype, rows, inter):
    check(inputs(rows, inter, dtype, seed=rows * inter))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows(dtype):
    wide = inputs(4, 1100 + 5, dtype, seed=1)  # rows strided by 2210, x starts 3 columns in
    x = wide[:, 3 : 3 + 2 * 1100]
    assert x.stride() == (2210, 1)
    check(x)
    check(x[:1].expand(3, -1))  # row stride 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_gate_value(dtype):
    gates = torch.arange(-(2**15), 2**15, dtype=torch.int16).view(dtype)
    gates = gates[gates.isfinite()]
    if dtype == torch.bfloat16:  # the interpreter's bf16 -> fp32 cast gets subnormals wrong: keep silu ~ g / 2 normal
        gates = gates[(gates.abs() >= 2**-125) | (gates == 0)]
    ups = torch.randn(gates.numel(), generator=torch.Generator().manual_seed(2)).to(dtype)
    check(torch.cat([gates, ups])[None])


def test_empty():
    for x in (torch.empty(0, 2 * 1100, dtype=torch.bfloat16), torch.empty(3, 0)):
        got = silu_and_mul(x)
        assert got.shape == (x.shape[0], x.shape[1] // 2) and got.dtype == x.dtype
    out = torch.empty(0, 8)
    assert silu_and_mul(torch.empty(0, 16), out=out) is out


@pytest.mark.parametrize("x,out,name", [
    (torch.zeros(8), None, "x"),
    (torch.zeros(2, 3, 8), None, "x"),
    (torch.zeros(2, 7), None, "x"),
    (torch.zeros(2, 8, dtype=torch.float64), None, "x"),
    (torch.zeros(2, 8, dtype=torch.int32), None, "x"),
    (torch.zeros(2, 16)[:, ::2], None, "x"),
    (torch.zeros(2, 8), torch.zeros(2, 8), "out"),
    (torch.zeros(2, 8), torch.zeros(2, 4, dtype=torch.bfloat16), "out"),
    (torch.zeros(2, 8), torch.zeros(4, 2).t(), "out"),
])
def test_bad_inputs_raise_naming_the_argument(x, out, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        silu_and_mul(x, out=out)
