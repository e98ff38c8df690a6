"""The fused norm + rotary + KV-store kernel on the CPU under Triton's interpreter (tests/kernels/conftest.py
switches it on), against the eager ops it replaces (rms_norm, rotary, store_kv): bit for bit in bf16, to 1e-5 in
fp32. Shapes are tiny; head counts that are not powers of two exercise the padded head rows of the tiles.

Caches start as NaN and are compared with NaN equal: a write for a padding token (slot -1), into a padded head
row or to a wrong slot shows up as a number where the reference left NaN, or as NaN where it wrote one."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from engine.kernels.kv_store import store_kv
from engine.kernels.rope_store import rope_store_kv
from engine.layers.ops import rms_norm, rotary
from engine.layers.rotary import RotaryEmbedding

EPS = 1e-6


def reference(qkv, heads, kv_heads, cos, sin, q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping):
    """The eager decoder-attention prologue, writing into k_cache / v_cache; cos/sin [T, 1, D] or [T, D]."""
    cos, sin = (t if t.dim() == 3 else t[:, None] for t in (cos, sin))
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    if q_norm_weight is not None:
        q, k = rms_norm(q, q_norm_weight, eps), rms_norm(k, k_norm_weight, eps)
    q, k = rotary(q, cos, sin), rotary(k, cos, sin)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def rope_table(tokens: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    """cos, sin [T, 1, D] from a real RotaryEmbedding table at scattered positions."""
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), head_dim, max_position=4096)
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(seed))
    positions[0] = 0  # cos 1, sin 0
    return rope(positions, dtype)


def make_inputs(tokens, heads, kv_heads, head_dim, block_size, dtype, norm, seed=0):
    """qkv with per-head scales far apart (so the norm matters and bf16 rounds at different exponents), norm
    weights near 1 (q and k differ), NaN caches with room to spare, distinct scattered slots, token 1 padding."""
    gen = torch.Generator().manual_seed(seed)
    width = heads + 2 * kv_heads
    scales = 2.0 ** torch.randint(-4, 5, (1, width, 1), generator=gen)
    qkv = (torch.randn(tokens, width, head_dim, generator=gen) * scales).to(dtype)
    cos, sin = rope_table(tokens, head_dim, dtype, seed)
    weights = (None, None)
    if norm:
        weights = tuple((1 + 0.3 * torch.randn(head_dim, generator=gen)).to(dtype) for _ in range(2))
    num_blocks = tokens // block_size + 3
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = torch.full(shape, math.nan, dtype=dtype), torch.full(shape, math.nan, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    if tokens > 1:
        slots[1] = -1
    return qkv, cos, sin, weights, k_cache, v_cache, slots


def assert_same(got, expected):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    else:
        mismatch = ~((got == expected) | (got.isnan() & expected.isnan()))
        assert not mismatch.any(), f"{mismatch.sum().item()} of {got.numel()} differ"


def check(qkv, heads, kv_heads, cos, sin, weights, k_cache, v_cache, slots, eps=EPS):
    """The kernel on (qkv, caches) and the reference on clones: q, both caches equal, and only the non-padding
    tokens' slots are written."""
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    expected = reference(qkv, heads, kv_heads, cos, sin, *weights, eps, k_ref, v_ref, slots)
    got = rope_store_kv(qkv, heads, kv_heads, cos, sin, *weights, eps, k_cache, v_cache, slots)
    assert got.is_contiguous()
    assert_same(got, expected)
    assert_same(k_cache, k_ref)
    assert_same(v_cache, v_ref)
    written = ~k_cache.isnan().flatten(0, 1).all(-1).all(-1)
    assert written.sum().item() == (slots >= 0).sum().item()
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (4, 4, 16, 4),  # group 1
    (6, 3, 64, 16),  # group 2, head rows padded to 8 and 4
    (12, 3, 16, 8),  # group 4, padded to 16 and 4
])
def test_matches_eager(dtype, norm, heads, kv_heads, head_dim, block_size):
    inputs = make_inputs(6, heads, kv_heads, head_dim, block_size, dtype, norm, seed=heads * head_dim)
    check(inputs[0], heads, kv_heads, *inputs[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eps_counts(dtype):
    """Values so small that eps = 0.01 dominates the mean of squares."""
    qkv, cos, sin, weights, k_cache, v_cache, slots = make_inputs(3, 2, 1, 16, 4, dtype, norm=True, seed=5)
    check(qkv * 0.01, 2, 1, cos, sin, weights, k_cache, v_cache, slots, eps=0.01)


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "qk_norm"])
def test_strided_qkv_cos_sin_and_caches(norm):
    """qkv sliced out of a wider matmul output and, separately, heads-major; cos/sin sliced out of a wider table
    and as [T, D]; caches heads-before-slots in memory."""
    heads, kv_heads, head_dim, block_size, dtype = 4, 2, 16, 4, torch.bfloat16
    qkv, cos, sin, weights, k_cache, v_cache, slots = make_inputs(5, heads, kv_heads, head_dim, block_size, dtype,
                                                                  norm, seed=7)
    width = (heads + 2 * kv_heads) * head_dim
    wide = torch.zeros(5, width + 8, dtype=dtype)
    wide[:, 3 : 3 + width] = qkv.flatten(1)
    strided = wide[:, 3 : 3 + width].view(5, heads + 2 * kv_heads, head_dim)
    heads_major = qkv.transpose(0, 1).contiguous().transpose(0, 1)
    wide_cos = torch.zeros(5, 1, 3 * head_dim, dtype=dtype)
    wide_cos[..., head_dim : 2 * head_dim] = cos
    caches = [c.transpose(1, 2).contiguous().transpose(1, 2) for c in (k_cache, v_cache)]
    assert strided.stride()[:2] == (width + 8, head_dim) and heads_major.stride()[0] == head_dim
    for x, c, s in ((strided, wide_cos[..., head_dim : 2 * head_dim], sin[:, 0]), (heads_major, cos[:, 0], sin)):
        check(x, heads, kv_heads, c, s, weights, *[c.clone() for c in caches], slots)


def test_padding_tokens_write_nothing_but_get_q():
    heads, kv_heads, head_dim, block_size, dtype = 2, 1, 16, 4, torch.bfloat16
    qkv, cos, sin, weights, k_cache, v_cache, _ = make_inputs(4, heads, kv_heads, head_dim, block_size, dtype, True)
    slots = torch.full((4,), -1, dtype=torch.int64)
    q = check(qkv, heads, kv_heads, cos, sin, weights, k_cache, v_cache, slots)
    assert k_cache.isnan().all() and v_cache.isnan().all() and not q.isnan().any()


def test_empty_batch():
    qkv = torch.empty(0, 4, 16)
    k_cache = torch.full((2, 4, 1, 16), math.nan)
    q = rope_store_kv(qkv, 2, 1, torch.empty(0, 1, 16), torch.empty(0, 1, 16), None, None, EPS, k_cache,
                      k_cache.clone(), torch.empty(0, dtype=torch.int64))
    assert q.shape == (0, 2, 16) and q.dtype == torch.float32 and k_cache.isnan().all()


def bad_args(**changes):
    """Valid arguments (2 q heads, 1 kv head, D 16, 3 tokens) with some replaced."""
    args = dict(qkv=torch.zeros(3, 4, 16), num_heads=2, num_kv_heads=1, cos=torch.zeros(3, 1, 16),
                sin=torch.zeros(3, 16), q_norm_weight=torch.ones(16), k_norm_weight=torch.ones(16), eps=EPS,
                k_cache=torch.zeros(2, 4, 1, 16), v_cache=torch.zeros(2, 4, 1, 16),
                slot_mapping=torch.zeros(3, dtype=torch.int64))
    return {**args, **changes}


@pytest.mark.parametrize("changes,name", [
    (dict(num_heads=3), "qkv"),  # 3 + 2 * 1 heads, qkv has 4
    (dict(num_kv_heads=2), "qkv"),
    (dict(qkv=torch.zeros(3, 64)), "qkv"),
    (dict(qkv=torch.zeros(3, 4, 24), cos=torch.zeros(3, 1, 24), sin=torch.zeros(3, 24), q_norm_weight=None,
          k_norm_weight=None, k_cache=torch.zeros(2, 4, 1, 24), v_cache=torch.zeros(2, 4, 1, 24)), "qkv"),
    (dict(k_norm_weight=None), "q_norm_weight"),
    (dict(q_norm_weight=None), "q_norm_weight"),
    (dict(k_norm_weight=torch.ones(8)), "k_norm_weight"),
    (dict(cos=torch.zeros(3, 2, 16)), "cos"),
    (dict(cos=torch.zeros(4, 16)), "cos"),
    (dict(sin=torch.zeros(3, 16, dtype=torch.bfloat16)), "sin"),
    (dict(k_cache=torch.zeros(2, 4, 2, 16)), "k_cache"),
    (dict(k_cache=torch.zeros(2, 4, 1, 16, dtype=torch.bfloat16)), "k_cache"),
    (dict(v_cache=torch.zeros(3, 4, 1, 16)), "v_cache"),
    (dict(slot_mapping=torch.zeros(2, dtype=torch.int64)), "slot_mapping"),
])
def test_bad_inputs_raise_naming_the_argument(changes, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        rope_store_kv(**bad_args(**changes))
