"""The Triton attention kernels against the torch reference backend, in fp32 on the CPU under Triton's interpreter
(tests/kernels/conftest.py switches it on). Shapes are tiny; small tiles (block_m/block_n 16) make short contexts
cross many tiles, block boundaries and split edges.

Every cache slot outside the sequences' contexts holds NaN in the Triton run (zeros for the reference): one stray
read of an unwritten slot, a padded table entry or a key past seq_len turns the output NaN."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from engine.kernels.decode_attention import choose_num_splits, paged_decode_attention
from engine.kernels.kv_store import store_kv
from engine.kernels.prefill_attention import paged_prefill_attention
from engine.layers.attention_backends import create_backend
from engine.layers.attention_backends.base import AttentionMetadata
from engine.layers.attention_backends.torch_backend import TorchAttentionBackend, write_kv
from engine.layers.attention_backends.triton_backend import TritonAttentionBackend
from engine.layers.ops import Ops
from tests.step_rows import metadata

TOL = dict(atol=1e-4, rtol=1e-4)


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor  # NaN outside the contexts
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float
    unused: torch.Tensor  # [num_blocks * block_size] bool: slots no sequence's context covers


def make_case(query_lens, seq_lens, *, block_size=16, kv_heads=2, group=2, head_dim=16, fused=False, seed=0,
              device="cpu", dtype=torch.float32) -> Case:
    """Sequences with random, scattered block tables (block 0 is never handed out, as padding points at it);
    positions before each sequence's new tokens hold random K/V (its cached prefix)."""
    gen = torch.Generator(device).manual_seed(seed)
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = 2 + sum(need)
    order = (torch.randperm(num_blocks - 1, generator=gen, device=device) + 1).tolist()
    tables = [order[sum(need[:i]) : sum(need[: i + 1])] for i in range(len(need))]
    meta = metadata(list(query_lens), list(seq_lens), tables, block_size, device)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, math.nan, dtype=dtype, device=device)
    v_cache = torch.full(shape, math.nan, dtype=dtype, device=device)
    prefix = torch.cat([torch.zeros(0, dtype=torch.long, device=device)] + [
        meta.block_tables[i, pos // block_size].long() * block_size + pos % block_size
        for i, pos in enumerate(torch.arange(s - q, device=device) for q, s in zip(query_lens, seq_lens))])
    for cache in (k_cache, v_cache):
        cache.view(-1, kv_heads, head_dim)[prefix] = torch.randn(
            len(prefix), kv_heads, head_dim, generator=gen, device=device).to(dtype)
    unused = torch.ones(num_blocks * block_size, dtype=torch.bool)
    unused[prefix.cpu()] = False
    unused[meta.slot_mapping.cpu()] = False
    heads = kv_heads * group
    qkv = torch.randn(sum(query_lens), heads + 2 * kv_heads, head_dim, generator=gen, device=device)
    qkv[:, :heads] *= 2  # peaked attention: outputs are not near-zero averages of many values
    qkv = qkv.to(dtype)
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
    if not fused:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return Case(q, k, v, k_cache, v_cache, meta, head_dim**-0.5, unused)


def reference(case: Case, dtype=None):
    """The torch backend's output and caches (on NaN-free copies of the caches), computed in `dtype` (default:
    the case's)."""
    dtype = dtype or case.q.dtype
    k_cache, v_cache = (c.nan_to_num(0.0).to(dtype) for c in (case.k_cache, case.v_cache))
    q, k, v = (t.to(dtype) for t in (case.q, case.k, case.v))
    out = TorchAttentionBackend(Ops.eager()).forward(q, k, v, k_cache, v_cache, case.meta, case.scale)
    return out, k_cache, v_cache


def with_padding_row(case: Case) -> Case:
    """The case plus one trailing CUDA-graph padding row: a one-token query with slot -1 and seq_len 0."""
    m = case.meta

    def cat(t, value):
        return torch.cat([t, t.new_tensor([value])])

    meta = AttentionMetadata(
        slot_mapping=cat(m.slot_mapping, -1), query_start=cat(m.query_start, int(m.query_start[-1]) + 1),
        seq_lens=cat(m.seq_lens, 0), key_start=cat(m.key_start, int(m.key_start[-1])),
        block_tables=torch.cat([m.block_tables, torch.zeros_like(m.block_tables[:1])]),
        max_query_len=m.max_query_len, max_seq_len=m.max_seq_len,
        query_lens_host=m.query_lens_host + [1], seq_lens_host=m.seq_lens_host + [0], num_decodes=m.num_decodes)

    def grow(t):
        return torch.cat([t, torch.randn_like(t[:1])])

    return Case(grow(case.q), grow(case.k), grow(case.v), case.k_cache.clone(), case.v_cache.clone(), meta,
                case.scale, case.unused)


def triton_forward(case: Case, *, block_m=None, block_n=None, num_splits=None) -> torch.Tensor:
    """The backend's steps with chosen tiles and split count; updates case's caches in place."""
    m = case.meta
    store_kv(case.k, case.v, case.k_cache, case.v_cache, m.slot_mapping)
    out = torch.empty(case.q.shape, dtype=case.q.dtype, device=case.q.device)
    if m.is_decode:
        paged_decode_attention(case.q, case.k_cache, case.v_cache, out, m.seq_lens, m.block_tables, case.scale,
                               num_splits or 1, block_n=block_n)
    else:
        paged_prefill_attention(case.q, case.k_cache, case.v_cache, out, m.query_start, m.seq_lens, m.block_tables,
                                m.max_query_len, case.scale, block_m=block_m, block_n=block_n)
    return out


def assert_caches_match(case: Case, ref_k, ref_v) -> None:
    """Context slots (cached prefix and new tokens) equal the reference's; every other slot is still NaN."""
    for ours, ref in ((case.k_cache, ref_k), (case.v_cache, ref_v)):
        ours, ref = ours.flatten(0, 1).to("cpu", ref.dtype), ref.flatten(0, 1).cpu()
        assert ours[case.unused].isnan().all()
        assert torch.equal(ours[~case.unused], ref[~case.unused])


def test_store_kv_matches_reference_and_skips_padding():
    case = with_padding_row(make_case([3, 1, 5], [3, 9, 20], block_size=8, fused=True))
    ref_k, ref_v = case.k_cache.nan_to_num(0.0), case.v_cache.nan_to_num(0.0)
    write_kv(case.k, case.v, ref_k, ref_v, case.meta.slot_mapping)
    store_kv(case.k, case.v, case.k_cache, case.v_cache, case.meta.slot_mapping)
    assert_caches_match(case, ref_k, ref_v)


DECODE_SHAPES = [  # head_dim, group (query heads per KV head), block_size
    (16, 1, 8), (32, 2, 16), (16, 4, 16), (32, 4, 8), (64, 2, 16),
]


@pytest.mark.parametrize("head_dim,group,block_size", DECODE_SHAPES)
def test_decode_matches_reference(head_dim, group, block_size):
    base = make_case([1] * 5, [1, 7, 33, 64, 100], block_size=block_size, group=group, head_dim=head_dim,
                     fused=head_dim == 32)
    case = with_padding_row(base)
    assert case.meta.is_decode
    ref, ref_k, ref_v = reference(base)
    out = TritonAttentionBackend(Ops.eager()).forward(case.q, case.k, case.v, case.k_cache, case.v_cache, case.meta,
                                           case.scale)
    torch.testing.assert_close(out[:-1], ref, **TOL)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # the padding row: zeros, not NaN
    # the padding row's k/v went nowhere: the caches are the unpadded reference's
    assert_caches_match(case, ref_k, ref_v)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # an empty split's LSE: log2(0) = -inf
@pytest.mark.parametrize("group", [1, 4])
def test_decode_splits_agree(group):
    """Split counts that divide nothing, leave splits empty (32 splits of a 40-token context) or are one tile."""
    base = make_case([1] * 4, [5, 40, 97, 130], block_size=8, kv_heads=1, group=group, fused=True, seed=1)
    ref, _, _ = reference(base)
    outs = []
    for splits in (1, 2, 3, 32):
        case = with_padding_row(base)
        out = triton_forward(case, block_n=16, num_splits=splits)
        torch.testing.assert_close(out[:-1], ref, **TOL)
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))
        outs.append(out)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim,group,block_size,tiles", [
    (16, 1, 8, 16), (32, 2, 16, 16), (16, 4, 8, None), (32, 4, 16, 16),
])
def test_prefill_without_prefix(head_dim, group, block_size, tiles):
    lens = [1, 19, 50]
    case = make_case(lens, lens, block_size=block_size, group=group, head_dim=head_dim, seed=2)
    ref, ref_k, ref_v = reference(case)
    out = triton_forward(case, block_m=tiles, block_n=tiles)
    torch.testing.assert_close(out, ref, **TOL)
    assert_caches_match(case, ref_k, ref_v)


@pytest.mark.parametrize("head_dim,group,block_size,tiles", [
    (16, 1, 16, 16), (32, 2, 8, 16), (16, 4, 16, None),
])
def test_prefill_with_cached_prefix(head_dim, group, block_size, tiles):
    """Prefix-cache hits: the context's head is already cached, only the tail is computed (some tails start
    mid-block, one is a single token)."""
    case = make_case([20, 3, 33, 1], [20 + 45, 3 + 64, 33 + 17, 1 + 8], block_size=block_size, group=group,
                     head_dim=head_dim, seed=3)
    ref, ref_k, ref_v = reference(case)
    out = triton_forward(case, block_m=tiles, block_n=tiles)
    torch.testing.assert_close(out, ref, **TOL)
    assert_caches_match(case, ref_k, ref_v)


@pytest.mark.parametrize("group,fused", [(2, True), (4, False)])
def test_chunked_prefill_mixed_batch(group, fused):
    """Decode rows, a prefill chunk continuing a partial prompt and a fresh prompt in one step, through the
    backend: the first four of the five leading decodes take the decode kernel, the rest (a decode after a
    prefill included) the prefill kernel; plus a padding row, which must stay harmless there too."""
    base = make_case([1, 1, 1, 1, 1, 24, 1, 9], [70, 33, 5, 17, 40, 40 + 24, 18, 9], block_size=16, group=group,
                     fused=fused, seed=4)
    case = with_padding_row(base)
    assert not case.meta.is_decode and case.meta.num_decodes == 5
    ref, ref_k, ref_v = reference(base)
    out = TritonAttentionBackend(Ops.eager()).forward(case.q, case.k, case.v, case.k_cache, case.v_cache, case.meta,
                                           case.scale)
    torch.testing.assert_close(out[:-1], ref, **TOL)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    assert_caches_match(case, ref_k, ref_v)


def test_fused_views_equal_contiguous_inputs():
    ours = [make_case([1, 12], [30, 12], fused=fused, seed=5) for fused in (True, False)]
    assert not ours[0].q.is_contiguous() and not ours[0].k.is_contiguous()
    backend = TritonAttentionBackend(Ops.eager())
    outs = [backend.forward(c.q, c.k, c.v, c.k_cache, c.v_cache, c.meta, c.scale) for c in ours]
    assert torch.equal(outs[0], outs[1])


def test_backend_contract():
    backend = create_backend("triton", torch.device("cpu"), torch.float32, Ops.eager())
    assert isinstance(backend, TritonAttentionBackend)
    assert (backend.name, backend.supports_cuda_graphs, backend.block_size_multiple) == ("triton", True, 1)


@pytest.mark.parametrize("head_dim", [8, 48, 96, 512])
def test_unsupported_head_dim_is_a_clear_error(head_dim):
    case = make_case([2], [2], head_dim=16)
    q = torch.zeros(2, 4, head_dim)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        paged_prefill_attention(q, case.k_cache, case.v_cache, q, case.meta.query_start, case.meta.seq_lens,
                                case.meta.block_tables, 2, 1.0)


def test_choose_num_splits():
    # few programs: up to MAX_SPLITS (16), if the context is long enough to fill them
    assert choose_num_splits(1, 8, 32768) == 16
    assert choose_num_splits(1, 8, 1024) == 4
    assert choose_num_splits(4, 8, 32768) == 9  # ceil(264 / 32)
    # enough programs already: no splitting
    assert choose_num_splits(64, 8, 32768) == 1
    assert choose_num_splits(256, 2, 32768) == 1
    for batch in range(1, 300, 7):
        assert 1 <= choose_num_splits(batch, 4, 8192) <= 16
