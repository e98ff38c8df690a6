"""The SwiGLU activation kernel on CUDA at real shapes (Llama-3.1-8B's intermediate 14336, Qwen3-0.6B's 3072):
bit for bit equal to eager torch in bf16/fp16, which takes libdevice's expf and an IEEE division as the kernel does
(tl.exp or tl.sigmoid, approximations, would miss on some of these millions of values)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.activation import silu_and_mul

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,inter", [(1, 14336), (256, 3072), (8192, 14336)])
def test_equals_eager(rows, inter, dtype):
    gen = torch.Generator(device="cuda").manual_seed(rows + inter)
    x = (torch.randn(rows, 2 * inter, device="cuda", generator=gen) * 4).to(dtype)
    got, expected = silu_and_mul(x), reference(x)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, expected), f"{(got != expected).sum().item()} of {got.numel()} differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_gate_value(dtype):
    gates = torch.arange(-(2**15), 2**15, dtype=torch.int16, device="cuda").view(dtype)
    gates = gates[gates.isfinite()]
    ups = torch.randn(gates.numel(), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)).to(dtype)
    x = torch.cat([gates, ups])[None]
    got, expected = silu_and_mul(x), reference(x)
    assert torch.equal(got, expected), f"{(got != expected).sum().item()} of {got.numel()} differ"


def test_offsets_past_2_to_the_31():
    rows, inter = 75000, 14336  # 2.15e9 elements in x: only int64 offsets reach the last rows
    x = torch.zeros(rows, 2 * inter, dtype=torch.bfloat16, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x[-3:] = torch.randn(3, 2 * inter, device="cuda", generator=gen).to(torch.bfloat16)
    got = silu_and_mul(x)
    assert torch.equal(got[-3:], reference(x[-3:]))
    assert not got[:-3].any()
