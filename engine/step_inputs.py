"""StepInputs: one engine step's token ids, positions and attention metadata, packed on the host into one pinned
buffer and sent to the device in one non-blocking copy.

Each copy to the device costs the GPU a few microseconds however small it is, and a batch-1 decode step has about
ten of these fields: one copy of all of them saves a visible share of a 4 ms step. Fields lie at offsets that
depend only on the step's sizes, so a decode step of a padded batch size always finds its fields at the same
device addresses, which is what the CUDA graph captured for that size reads. Rows past the batch (padding up to a
captured size) get slot -1 and context length 0: they write nothing and attend to nothing.

Two host buffers take turns: the copy of step N may still be queued behind step N-1 on the device when the host
fills step N+1's inputs.

With overlapped steps, a decode row's input token may still be on the device (sampled by the step in flight):
it is copied there from that step's sampled tokens, so preparing the next step never waits for the device.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.layers.attention_backends.base import AttentionMetadata
from engine.scheduler import ScheduledRequest

ALIGN = 16  # bytes: every field starts aligned for any dtype and for vector loads


def layout(tokens: int, rows: int, samples: int, pending: int, table_len: int
           ) -> tuple[dict[str, tuple[int, int, torch.dtype]], int]:
    """(field name -> (byte offset, length, dtype), bytes in all). The fields a decode graph reads come first, so
    their offsets depend on `tokens` and `rows` alone."""
    i64, i32 = torch.int64, torch.int32
    fields = (("ids", tokens, i64), ("positions", tokens, i64), ("slots", tokens, i64),
              ("seq_lens", rows, i32), ("query_start", rows + 1, i32), ("key_start", rows + 1, i32),
              ("sample_rows", samples, i64), ("pending_dst", pending, i64), ("pending_src", pending, i64),
              ("tables", table_len, i32))
    out, offset = {}, 0
    for name, length, dtype in fields:
        out[name] = (offset, length, dtype)
        offset += -(-length * dtype.itemsize // ALIGN) * ALIGN
    return out, offset


def views(buffer: torch.Tensor, fields: dict[str, tuple[int, int, torch.dtype]]) -> dict[str, torch.Tensor]:
    """Each field as a typed view of the uint8 buffer."""
    return {name: buffer[off : off + length * dtype.itemsize].view(dtype)
            for name, (off, length, dtype) in fields.items()}


class StepInputs:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, block_size: int,
                 device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        pin = device.type == "cuda"
        _, size = layout(max_tokens, max_seqs, max_seqs, max_seqs, max_seqs * max_blocks_per_seq)
        self.host = [torch.zeros(size, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.turn = 0
        self.packed = torch.zeros(size, dtype=torch.uint8, device=device)
        # Block tables travel compactly ([B, widest table this step]) and are spread into the full-width device
        # table on the device: copying max_model_len / block_size columns per row every step would cost more.
        self.block_tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)

    def prepare(self, rows: list[ScheduledRequest], pad_to: int | None = None,
                pending: tuple[torch.Tensor, dict[str, int]] | None = None):
        """Fill the buffers for this step's rows, decodes first (padded to `pad_to` rows, decode only).
        `pending` holds the previous step's sampled tokens on the device and each sampled request's row in them
        (by request id), for inputs not yet on the host. Returns (input ids, positions, metadata, rows to
        sample) as views of the device buffers."""
        counts = [r.num_tokens for r in rows]
        n = len(rows)
        padded = pad_to or n
        bs = self.block_size
        tokens = sum(counts) + (padded - n)  # padding rows are one token each (decode only)
        width = max(-(-(r.start + r.num_tokens) // bs) for r in rows)
        samples = sum(r.sample for r in rows)
        num_pending = sum(1 for r in rows if r.num_tokens == 1 and r.input_pending)
        fields, used = layout(tokens, padded, samples, num_pending, padded * width)
        host = self.host[self.turn]
        self.turn ^= 1
        view = {name: tensor.numpy() for name, tensor in views(host, fields).items()}
        ids, positions, slots, seq_lens = view["ids"], view["positions"], view["slots"], view["seq_lens"]
        tables = view["tables"].reshape(padded, width)
        tables[:] = 0
        t = num_samples = p = 0
        for i, row in enumerate(rows):
            start, count, table = row.start, row.num_tokens, row.block_table
            end = start + count
            tables[i, : len(table[:width])] = table[:width]
            if count == 1:
                if row.input_pending:  # sampled by the step in flight: filled in on the device below
                    ids[t] = 0
                    view["pending_dst"][p] = t
                    view["pending_src"][p] = pending[1][row.request_id]
                    p += 1
                else:
                    ids[t] = row.token_ids[start]
                positions[t] = start
                slots[t] = table[start // bs] * bs + start % bs
            else:
                ids[t : t + count] = row.token_ids[start:end]
                pos = np.arange(start, end)
                positions[t : t + count] = pos
                slots[t : t + count] = tables[i, pos // bs] * bs + pos % bs
            t += count
            seq_lens[i] = end
            if row.sample:
                view["sample_rows"][num_samples] = t - 1
                num_samples += 1
        ids[t:], positions[t:], slots[t:] = 0, 0, -1
        seq_lens[n:] = 0
        view["query_start"][:] = np.concatenate(([0], np.cumsum(counts), t + np.arange(1, padded - n + 1)))
        view["key_start"][:] = np.concatenate(([0], np.cumsum(seq_lens)))

        self.packed[:used].copy_(host[:used], non_blocking=True)
        dev = views(self.packed, fields)
        if num_pending:
            dev["ids"].index_copy_(0, dev["pending_dst"], pending[0].index_select(0, dev["pending_src"]))
        self.block_tables[:padded, :width].copy_(dev["tables"].view(padded, width))
        max_seq_len = int(seq_lens[:n].max())
        if max(counts) == 1:  # padded for a CUDA graph: the full-width table it captured; eager: the columns in use
            meta = self._decode_metadata(dev, padded, max_seq_len, seq_lens[:n].tolist(), None if pad_to else width)
        else:
            meta = self._prefill_metadata(dev, width, counts, max_seq_len, seq_lens[:n].tolist())
        return dev["ids"], dev["positions"], meta, dev["sample_rows"]

    def graph_inputs(self, rows: int, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The device views a decode step of `rows` padded rows reads, which a CUDA graph captures in place:
        `prepare` of such a step fills exactly these."""
        dev = views(self.packed, layout(rows, rows, 0, 0, 0)[0])
        return dev["ids"], dev["positions"], self._decode_metadata(dev, rows, max_seq_len, [max_seq_len] * rows)

    # -- the metadata: one decode path, one prefill path ---------------------------------------------------------
    def _decode_metadata(self, dev: dict[str, torch.Tensor], rows: int, max_seq_len: int, seq_lens_host: list[int],
                         width: int | None = None) -> AttentionMetadata:
        """Every row brings one token. Padding rows are counted in (their context is empty)."""
        return AttentionMetadata(
            slot_mapping=dev["slots"], query_start=dev["query_start"], seq_lens=dev["seq_lens"],
            key_start=dev["key_start"],
            block_tables=self.block_tables[:rows] if width is None else self.block_tables[:rows, :width],
            max_query_len=1, max_seq_len=max_seq_len, query_lens_host=[1] * len(seq_lens_host),
            seq_lens_host=seq_lens_host, num_decodes=rows)

    def _prefill_metadata(self, dev: dict[str, torch.Tensor], width: int, counts: list[int], max_seq_len: int,
                          seq_lens_host: list[int]) -> AttentionMetadata:
        """Some rows bring several tokens; the leading one-token rows are the step's decodes."""
        rows = len(counts)
        return AttentionMetadata(
            slot_mapping=dev["slots"], query_start=dev["query_start"], seq_lens=dev["seq_lens"],
            key_start=dev["key_start"], block_tables=self.block_tables[:rows, :width],
            max_query_len=max(counts), max_seq_len=max_seq_len, query_lens_host=list(counts),
            seq_lens_host=seq_lens_host, num_decodes=next((i for i, c in enumerate(counts) if c != 1), rows))
