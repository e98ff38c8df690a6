"""The flash_attn backend against the torch reference, with flash-attn replaced by tests/flash_attn_standin (plain
torch implementing flash-attn's documented contracts: flash-attn has no wheel for our machines and cannot be
built without a GPU). What this checks is kvgate's side: the arguments, dtypes and layouts it hands flash-attn."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from engine.layers.attention_backends import create_backend
from engine.layers.attention_backends.flash_backend import FlashAttentionBackend
from engine.layers.attention_backends.torch_backend import TorchAttentionBackend
from engine.layers.ops import Ops
from tests.step_rows import metadata

STANDIN = Path(__file__).parent / "flash_attn_standin"
BLOCK = 256
NUM_BLOCKS = 12


@pytest.fixture
def flash_attn(monkeypatch):
    """The stand-in importable as `flash_attn` for this test only. It also computes in float32, which the CPU
    runs these tests in (real flash-attn takes fp16 and bf16 only)."""
    monkeypatch.setattr(FlashAttentionBackend, "dtypes", (*FlashAttentionBackend.dtypes, torch.float32))
    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    yield
    sys.modules.pop("flash_attn", None)


@pytest.fixture
def no_flash_attn(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes imports fail and find_spec return None


# ------------------------------------------------------------------------------------------------ the kernels

SHAPES = [(4, 4, 32), (8, 2, 64)]  # heads, kv heads, head_dim: no GQA, then GQA groups of 4
SHAPE_IDS = ["mha-d32", "gqa4-d64"]


def _padded(meta):
    """`meta` plus one row padded in for a CUDA graph: slot -1, context length 0, an all-zero block table row."""
    meta.slot_mapping = torch.cat([meta.slot_mapping, meta.slot_mapping.new_tensor([-1])])
    meta.query_start = torch.cat([meta.query_start, meta.query_start[-1:] + 1])
    meta.seq_lens = torch.cat([meta.seq_lens, meta.seq_lens.new_zeros(1)])
    meta.key_start = torch.cat([meta.key_start, meta.key_start[-1:]])
    meta.block_tables = torch.cat([meta.block_tables, meta.block_tables.new_zeros(1, meta.block_tables.shape[1])])
    meta.query_lens_host.append(1)
    meta.seq_lens_host.append(0)
    return meta


def _run_both(query_lens, seq_lens, tables, heads, kv_heads, head_dim, pad=False):
    """Run one step through both backends on identical random inputs and caches (the caches start as random
    values, standing for earlier tokens' K/V and for garbage a mask must hide); compare outputs and caches."""
    gen = torch.Generator().manual_seed(sum(seq_lens) + head_dim)
    meta = metadata(query_lens, seq_lens, tables, BLOCK, "cpu")
    if pad:
        meta = _padded(meta)
    rows = meta.slot_mapping.numel()
    # q, k, v as the model makes them: non-contiguous views into one projection output
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(rows, heads, head_dim), k.view(rows, kv_heads, head_dim), v.view(rows, kv_heads, head_dim)
    shape = (NUM_BLOCKS, BLOCK, kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    flash_k, flash_v = k_cache.clone(), v_cache.clone()
    want_k, want_v = k_cache.clone(), v_cache.clone()

    scale = head_dim**-0.5
    expected = TorchAttentionBackend(Ops.eager()).forward(q, k, v, k_cache, v_cache, meta, scale)
    out = FlashAttentionBackend(Ops.eager()).forward(q, k, v, flash_k, flash_v, meta, scale)

    real = sum(query_lens)  # padding rows come last; their output is ignored
    assert out.shape == (rows, heads, head_dim)
    torch.testing.assert_close(out[:real], expected[:real], atol=2e-5, rtol=1e-4)
    # the new K/V sit exactly at positions seq_len - query_len .. seq_len - 1, and nothing else changed
    row = 0
    for q_len, s_len, table in zip(query_lens, seq_lens, tables):
        for pos in range(s_len - q_len, s_len):
            want_k[table[pos // BLOCK], pos % BLOCK] = k[row]
            want_v[table[pos // BLOCK], pos % BLOCK] = v[row]
            row += 1
    assert torch.equal(flash_k, want_k) and torch.equal(flash_v, want_v)


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES, ids=SHAPE_IDS)
def test_decode(flash_attn, heads, kv_heads, head_dim):
    """One new token per sequence; contexts inside, on and across block boundaries, plus a padded row."""
    seq_lens = [1, 255, 256, 257, 700]
    tables = [[3], [0], [7], [5, 2], [9, 1, 11]]
    _run_both([1] * len(seq_lens), seq_lens, tables, heads, kv_heads, head_dim, pad=True)


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES, ids=SHAPE_IDS)
def test_prefill(flash_attn, heads, kv_heads, head_dim):
    """Fresh prompts: nothing cached before them."""
    seq_lens = [5, 256, 300]
    _run_both(seq_lens, seq_lens, [[2], [8], [1, 6]], heads, kv_heads, head_dim)


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES, ids=SHAPE_IDS)
def test_prefill_after_prefix_cache_hit(flash_attn, heads, kv_heads, head_dim):
    """Prompts whose first blocks were found in the prefix cache: the new tokens attend over the cached ones."""
    _run_both([20, 256, 3], [532, 512, 259], [[4, 0, 10], [7, 3], [5, 1]], heads, kv_heads, head_dim)


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES, ids=SHAPE_IDS)
def test_mixed_chunked_batch(flash_attn, heads, kv_heads, head_dim):
    """Decodes, a prompt chunk resuming mid-prompt (mid-block) and a fresh prompt's first chunk, in one step."""
    query_lens = [1, 37, 1, 12]
    seq_lens = [90, 300, 513, 12]
    tables = [[6], [2, 9], [0, 4, 11], [8]]
    _run_both(query_lens, seq_lens, tables, heads, kv_heads, head_dim)


def test_standin_rejects_what_flash_attn_rejects(flash_attn):
    """The stand-in enforces the documented contract (else the comparisons above would prove little)."""
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    q = torch.randn(1, 1, 2, 32)
    cache = torch.zeros(2, BLOCK, 2, 32)
    table, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, block_table=table)  # valid
    with pytest.raises(AssertionError, match="int32"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens.long(), block_table=table)
    with pytest.raises(AssertionError, match="int32"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, block_table=table.long())
    with pytest.raises(AssertionError, match="divisible by 256"):
        small = torch.zeros(2, 16, 2, 32)
        flash_attn_with_kvcache(q, small, small, cache_seqlens=lens, block_table=table)
    with pytest.raises(TypeError):  # an argument kvgate does not use
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, block_table=table, num_splits=1)
    cu = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(AssertionError, match="max_seqlen_k"):
        flash_attn_varlen_func(q[0], cache, cache, cu, cu, 1, 0, block_table=table)
    with pytest.raises(AssertionError, match="int32"):
        flash_attn_varlen_func(q[0], cache, cache, cu.long(), cu, 1, 1, block_table=table)


# ------------------------------------------------------------------------------------------------ selection

CUDA, BF16 = torch.device("cuda"), torch.bfloat16


def test_auto_picks_flash_attn_on_cuda_when_importable(flash_attn):
    backend = create_backend("auto", CUDA, BF16, Ops.eager())
    assert backend.name == "flash_attn" and backend.supports_cuda_graphs and backend.block_size_multiple == 256


def test_auto_picks_triton_on_cuda_without_flash_attn_or_for_float32(flash_attn, monkeypatch):
    monkeypatch.setattr(FlashAttentionBackend, "dtypes", (torch.float16, torch.bfloat16))
    assert create_backend("auto", CUDA, torch.float32, Ops.eager()).name == "triton"  # flash-attn has no fp32
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes imports fail and find_spec return None
    assert create_backend("auto", CUDA, BF16, Ops.eager()).name == "triton"


def test_auto_picks_torch_on_cpu(flash_attn):
    assert create_backend("auto", torch.device("cpu"), BF16, Ops.eager()).name == "torch"


def test_flash_attn_without_the_package_says_how_to_install_it(no_flash_attn):
    with pytest.raises(ImportError, match=r"pip install kvgate\[flash\]"):
        create_backend("flash_attn", CUDA, BF16, Ops.eager())


def test_a_backend_refuses_a_dtype_it_does_not_compute_in(monkeypatch):
    monkeypatch.setattr(FlashAttentionBackend, "dtypes", (torch.float16, torch.bfloat16))
    with pytest.raises(ValueError, match="attention_backend 'flash_attn' computes in float16, bfloat16, not float32"):
        create_backend("flash_attn", CUDA, torch.float32, Ops.eager())


# ------------------------------------------------------------------------------------------------ end to end

@pytest.mark.usefixtures("deadline")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_greedy_matches_torch_backend(flash_attn, tiny_checkpoint, arch):
    """A whole engine on the CPU with the flash_attn backend: prompts across block boundaries, chunked prefill
    (mixed steps) and prefix-cache hits give the torch backend's greedy tokens."""
    import random

    from engine import LLM, EngineConfig, SamplingParams

    rng = random.Random(7)
    shared = [rng.randrange(4, 512) for _ in range(300)]  # more than one block: a second run hits the cache
    prompts = [[rng.randrange(4, 512) for _ in range(n)] for n in (1, 17, 255, 256, 257)]
    prompts += [shared + [rng.randrange(4, 512) for _ in range(n)] for n in (3, 40)]
    greedy = SamplingParams(temperature=0, ignore_eos=True, max_tokens=8)

    def run(backend: str):
        config = EngineConfig(model=str(tiny_checkpoint(arch)), attention_backend=backend, block_size=BLOCK,
                              device="cpu", num_kv_blocks=32, max_num_batched_tokens=128, in_process=True)
        with LLM(config=config) as engine:
            first = engine.generate(prompts, greedy, use_tqdm=False)
            second = engine.generate(prompts[-2:], greedy, use_tqdm=False)
        assert [o.num_cached_tokens for o in second] == [BLOCK, BLOCK]
        return [o.outputs[0].token_ids for o in first + second]

    assert run("flash_attn") == run("torch")
