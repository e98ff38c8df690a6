"""The GPU path's host side, on the CPU: step inputs equal the reference metadata (padding rows included), the
CUDA-graph batch sizes, and the block size each backend gets."""

from __future__ import annotations

import pytest
import torch

from engine.cuda_graphs import capture_sizes
from engine.model_runner import resolve_block_size
from engine.step_inputs import StepInputs
from tests.step_rows import row

BS = 8


def _batch(specs):
    """specs: (tokens known on the host, computed, new tokens, sample, block table)."""
    return [row(tokens, computed, new, table, sample, request_id=f"r{i}")
            for i, (tokens, computed, new, sample, table) in enumerate(specs)]


def _reference_slots(query_lens, seq_lens, tables):
    """Each new token's cache slot, computed the plain way."""
    return [t[p // BS] * BS + p % BS for q, s, t in zip(query_lens, seq_lens, tables) for p in range(s - q, s)]


def _inputs() -> StepInputs:
    return StepInputs(max_tokens=64, max_seqs=8, max_blocks_per_seq=16, block_size=BS, device=torch.device("cpu"))


def test_mixed_batch_matches_reference_metadata():
    specs = [
        (list(range(10, 30)), 19, 1, True, [5, 2, 9]),  # decode at position 19
        (list(range(40, 60)), 8, 12, True, [7, 3, 4]),  # a chunk after a cached block, reaching its end
        (list(range(70, 90)), 0, 5, False, [1, 6, 8]),  # a first chunk: nothing sampled
    ]
    batch = _batch(specs)
    ids, positions, meta, rows = _inputs().prepare(batch)
    assert ids.tolist() == [29] + list(range(48, 60)) + list(range(70, 75))
    assert positions.tolist() == [19] + list(range(8, 20)) + list(range(0, 5))
    assert meta.slot_mapping.tolist() == _reference_slots([1, 12, 5], [20, 20, 5], [s[4] for s in specs])
    assert meta.query_start.tolist() == [0, 1, 13, 18] and meta.key_start.tolist() == [0, 20, 40, 45]
    assert meta.seq_lens.tolist() == [20, 20, 5]
    assert meta.block_tables.tolist() == [s[4] for s in specs]  # as wide as the widest table in use
    assert (meta.max_query_len, meta.max_seq_len, meta.num_decodes) == (12, 20, 1)
    assert (meta.query_lens_host, meta.seq_lens_host) == ([1, 12, 5], [20, 20, 5])
    assert rows.tolist() == [0, 12]  # the last row of each sampled sequence


def test_inputs_still_on_the_device_come_from_the_last_sampled_tokens():
    """Overlapped steps: a decode row whose token the host has not seen reads it from the previous step's
    sampled tokens (by that step's row), while other rows keep their host token."""
    specs = [(list(range(10, 20)), 10, 1, True, [5, 2]), (list(range(30, 45)), 14, 1, True, [7, 3])]
    batch = _batch(specs)  # r0's token at position 10 is still on the device: the host knows 10 tokens
    last_sampled = torch.tensor([111, 222, 333]), {"r0": 2}
    ids, positions, meta, _ = _inputs().prepare(batch, pending=last_sampled)
    assert ids.tolist() == [333, 44] and positions.tolist() == [10, 14]
    assert meta.slot_mapping.tolist() == [2 * BS + 2, 3 * BS + 6]


def test_padded_decode_rows_write_nothing_and_see_nothing():
    inputs = _inputs()
    inputs.prepare(_batch([(list(range(40)), 0, 40, True, [1, 2, 3, 4, 5])]))  # leaves stale values behind
    specs = [(list(range(20)), 19, 1, True, [3, 1, 4]), (list(range(9)), 8, 1, True, [2, 6])]
    ids, positions, meta, rows = inputs.prepare(_batch(specs), pad_to=4)
    assert ids.tolist() == [19, 8, 0, 0] and positions.tolist() == [19, 8, 0, 0]
    assert meta.slot_mapping.tolist() == [4 * BS + 3, 6 * BS + 0, -1, -1]
    assert meta.seq_lens.tolist() == [20, 9, 0, 0]
    assert meta.query_start.tolist() == [0, 1, 2, 3, 4]
    assert meta.block_tables.shape == (4, 16)  # full width: the shape a captured graph reads
    assert meta.block_tables[0, :3].tolist() == [3, 1, 4] and meta.block_tables[1, :2].tolist() == [2, 6]
    assert meta.is_decode and rows.tolist() == [0, 1]


def test_a_padded_decode_step_fills_the_views_its_graph_captured():
    """A CUDA graph reads the addresses it was captured with: a decode step padded to that size must put its
    inputs exactly there, whatever steps of other shapes came before."""
    inputs = _inputs()
    graph_ids, graph_positions, graph_meta = inputs.graph_inputs(4, max_seq_len=128)
    inputs.prepare(_batch([(list(range(30)), 0, 30, True, [1, 2, 3, 4])]))  # a prefill moves nothing
    specs = [(list(range(20)), 19, 1, True, [3, 1, 4]), (list(range(9)), 8, 1, True, [2, 6])]
    ids, positions, meta, _ = inputs.prepare(_batch(specs), pad_to=4)
    pairs = [(graph_ids, ids), (graph_positions, positions)] + [
        (getattr(graph_meta, name), getattr(meta, name))
        for name in ("slot_mapping", "query_start", "seq_lens", "key_start", "block_tables")]
    for captured, filled in pairs:
        assert (captured.data_ptr(), captured.shape, captured.dtype) == (filled.data_ptr(), filled.shape, filled.dtype)
    assert graph_ids.tolist() == [19, 8, 0, 0] and graph_meta.seq_lens.tolist() == [20, 9, 0, 0]


def test_the_next_step_fills_the_other_host_buffer():
    """Step N's copy to the device may still be queued when step N+1 is prepared: N+1 must not overwrite the
    host memory that copy reads."""
    inputs = _inputs()
    inputs.prepare(_batch([(list(range(100, 110)), 0, 10, True, [1, 2])]))
    first = inputs.host[0].clone()
    inputs.prepare(_batch([(list(range(200, 212)), 0, 12, True, [3, 4])]))
    assert torch.equal(inputs.host[0], first)
    ids, _, _, _ = inputs.prepare(_batch([(list(range(300, 305)), 0, 5, True, [5])]))
    assert ids.tolist() == list(range(300, 305))


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and all(b - a == 16 for a, b in zip(sizes[4:], sizes[5:]))


class _Backend:
    def __init__(self, name, multiple):
        self.name, self.block_size_multiple = name, multiple


def test_block_size_per_backend():
    assert resolve_block_size(None, _Backend("triton", 1)) == 16
    assert resolve_block_size(32, _Backend("triton", 1)) == 32
    assert resolve_block_size(None, _Backend("flash_attn", 256)) == 256
    with pytest.raises(ValueError, match="block_size 16 .*flash_attn.*multiple of 256"):
        resolve_block_size(16, _Backend("flash_attn", 256))
