"""The Triton attention backend on CUDA at real shapes in bf16 (8 KV heads; head_dim 64 and 128; GQA 1, 4, 8;
block sizes 16, 32, 256; contexts up to 32k), against the torch backend computed in fp32 on the same bf16 inputs,
and the decode path replayed in a CUDA graph. Cases, NaN-poisoned caches and helpers: test_triton_attention."""

from __future__ import annotations

import pytest
import torch

from engine.layers.attention_backends.base import AttentionMetadata
from engine.layers.attention_backends.triton_backend import TritonAttentionBackend
from engine.layers.ops import Ops
from tests.step_rows import metadata
from tests.kernels.test_triton_attention import (
    Case,
    assert_caches_match,
    make_case,
    reference,
    triton_forward,
    with_padding_row,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = dict(atol=2e-2, rtol=2e-2)
KV_HEADS = 8
SHAPES = [  # head_dim, group (query heads per KV head), block_size
    (128, 1, 16), (128, 4, 32), (128, 8, 256), (64, 4, 16), (64, 8, 32), (64, 1, 256),
]
SHAPE_IDS = [f"d{d}-g{g}-bs{b}" for d, g, b in SHAPES]


def gpu_case(query_lens, seq_lens, shape, seed=0, fused=True) -> Case:
    head_dim, group, block_size = shape
    return make_case(query_lens, seq_lens, block_size=block_size, kv_heads=KV_HEADS, group=group,
                     head_dim=head_dim, fused=fused, seed=seed, device="cuda", dtype=torch.bfloat16)


def backend_forward(case: Case) -> torch.Tensor:
    return TritonAttentionBackend(Ops.eager()).forward(case.q, case.k, case.v, case.k_cache, case.v_cache, case.meta,
                                            case.scale)


def check(case: Case) -> None:
    """The backend on `case` matches the fp32 reference, output and cache."""
    ref, ref_k, ref_v = reference(case, torch.float32)
    torch.testing.assert_close(backend_forward(case).float(), ref, **TOL)
    assert_caches_match(case, ref_k, ref_v)


def check_padded(case: Case, base: Case) -> None:
    """The backend on `case` (= base plus a trailing padding row) matches the fp32 reference on `base`."""
    ref, ref_k, ref_v = reference(base, torch.float32)
    out = backend_forward(case)
    assert not out.isnan().any()
    torch.testing.assert_close(out[:-1].float(), ref, **TOL)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    assert_caches_match(case, ref_k, ref_v)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_decode_long_mixed_contexts(shape):
    base = gpu_case([1] * 6, [32768, 9000, 4099, 1, 130, 30001], shape)
    case = with_padding_row(base)
    assert case.meta.is_decode
    check_padded(case, base)


def test_decode_split_counts_agree():
    base = gpu_case([1] * 4, [32768, 5000, 64, 1], (128, 8, 16), seed=1)
    ref, _, _ = reference(base, torch.float32)
    outs = []
    for splits in (1, 8, 32):
        case = with_padding_row(base)
        out = triton_forward(case, num_splits=splits)
        torch.testing.assert_close(out[:-1].float(), ref, **TOL)
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))
        outs.append(out)
    for out in outs[1:]:  # fp32 partials: splitting only moves the final rounding
        torch.testing.assert_close(out, outs[0], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_prefill_without_prefix(shape):
    lens = [4096, 1000, 17, 1]
    check(gpu_case(lens, lens, shape, seed=2))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_prefill_with_cached_prefix(shape):
    check(gpu_case([4096, 300, 1], [4096 + 3000, 300 + 8191, 1 + 50], shape, seed=3))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_chunked_mixed_batch(shape):
    """Decode rows, a chunk continuing a long prompt and a fresh prompt in one step, plus a padding row."""
    base = gpu_case([1, 2048, 1, 512, 1], [30000, 2048 + 5000, 77, 512, 1], shape, seed=4)
    case = with_padding_row(base)
    assert not case.meta.is_decode
    check_padded(case, base)


def test_decode_cuda_graph_replays_with_new_inputs():
    """Capture a padded decode step the way DecodeGraphs does (slots -1, seq_lens 1, zero tables), then refill the
    persistent buffers in place for two different steps: each replay matches the reference and an eager run."""
    shape = (128, 4, 16)
    head_dim, group, block_size = shape
    lens = [3000, 1, 517, 2048]
    base = gpu_case([1] * len(lens), lens, shape, seed=5, fused=False)
    tables = [row[: -(-n // block_size)].tolist() for row, n in zip(base.meta.block_tables, lens)]
    width, rows, heads = base.meta.block_tables.shape[1], len(lens) + 1, KV_HEADS * group
    dev = torch.device("cuda")
    q = torch.zeros(rows, heads, head_dim, dtype=torch.bfloat16, device=dev)
    k = torch.zeros(rows, KV_HEADS, head_dim, dtype=torch.bfloat16, device=dev)
    v = torch.zeros_like(k)
    slots = torch.full((rows,), -1, dtype=torch.long, device=dev)
    seq_lens = torch.ones(rows, dtype=torch.int32, device=dev)
    starts = torch.arange(rows + 1, dtype=torch.int32, device=dev)
    block_tables = torch.zeros(rows, width, dtype=torch.int32, device=dev)
    meta = AttentionMetadata(slots, starts, seq_lens, starts.clone(), block_tables, 1, width * block_size,
                             [1] * rows, [width * block_size] * rows)
    backend = TritonAttentionBackend(Ops.eager())
    backend.forward(q, k, v, base.k_cache, base.v_cache, meta, base.scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, base.k_cache, base.v_cache, meta, base.scale)

    for step, step_lens in enumerate(([max(1, n - 40) for n in lens], lens)):
        step_meta = metadata([1] * len(lens), step_lens, tables, block_size, dev, full_width=width)
        gen = torch.Generator(dev).manual_seed(10 + step)
        new_q, new_k, new_v = (torch.randn(len(lens), *t.shape[1:], generator=gen, device=dev).to(t.dtype)
                               for t in (q, k, v))
        for buffer, value in ((q, new_q), (k, new_k), (v, new_v), (slots, step_meta.slot_mapping),
                              (seq_lens, step_meta.seq_lens), (block_tables, step_meta.block_tables)):
            buffer[: len(lens)].copy_(value)
        seq_lens[-1] = 0  # the padding row, as a padded replay leaves it: slot -1, seq_len 0, zero table
        eager_cache = (base.k_cache.clone(), base.v_cache.clone())
        graph.replay()
        flat_k = base.k_cache.view(-1, KV_HEADS, head_dim)
        assert torch.equal(flat_k[step_meta.slot_mapping], new_k)
        ref_case = Case(new_q, new_k, new_v, base.k_cache.clone(), base.v_cache.clone(), step_meta, base.scale,
                        base.unused)
        ref, _, _ = reference(ref_case, torch.float32)
        torch.testing.assert_close(out[:-1].float(), ref, **TOL)
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))
        eager = backend.forward(q, k, v, *eager_cache, meta, base.scale)
        assert torch.equal(eager, out)
