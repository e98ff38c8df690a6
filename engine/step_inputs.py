"""StepInputs: one engine step's token ids, positions and attention metadata, built on the host in pinned
buffers and copied into persistent device buffers with non-blocking copies.

The device buffers never move, so a CUDA graph captured over their first B rows reads each new step's inputs
in place. Rows past the batch (padding up to a captured size) get slot -1 and context length 0: they write
nothing and attend to nothing.

With overlapped steps, a decode row's input token may still be on the device (sampled by the step in flight):
it is copied there from that step's sampled tokens, so preparing the next step never waits for the device.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.layers.attention import AttentionMetadata, leading_decodes
from engine.scheduler import ScheduledBatch


class StepInputs:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, block_size: int,
                 device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        pin = device.type == "cuda"

        def pair(shape, dtype):
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, host.numpy(), torch.zeros(shape, dtype=dtype, device=device)

        self.ids = pair(max_tokens, torch.int64)
        self.positions = pair(max_tokens, torch.int64)
        self.slots = pair(max_tokens, torch.int64)
        self.sample_rows = pair(max_seqs, torch.int64)
        self.pending_dst = pair(max_seqs, torch.int64)  # rows of ids whose token is on the device...
        self.pending_src = pair(max_seqs, torch.int64)  # ...at these rows of the previous step's sampled tokens
        self.seq_lens = pair(max_seqs, torch.int32)
        self.query_start = pair(max_seqs + 1, torch.int32)
        self.key_start = pair(max_seqs + 1, torch.int32)
        # Block tables travel compactly ([B, widest table this step]) and are spread into the full-width device
        # table on the device: copying max_model_len / block_size columns per row every step would cost more.
        self.tables_host = torch.zeros(max_seqs * max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
        self.tables_staging = torch.zeros(max_seqs * max_blocks_per_seq, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)

    def prepare(self, batch: ScheduledBatch, pad_to: int | None = None,
                pending: tuple[torch.Tensor, dict[int, int]] | None = None):
        """Fill the buffers for this batch (padded to `pad_to` rows, decode only). `pending` is the previous
        step's sampled tokens on the device and each sampled sequence's row in them (by id()), for inputs not yet
        on the host. Returns (input ids, positions, metadata, rows to sample) as views of the device buffers."""
        seqs, counts = batch.seqs, batch.num_new_tokens
        n = len(seqs)
        rows = pad_to or n
        bs = self.block_size
        ids, positions, slots = self.ids[1], self.positions[1], self.slots[1]
        seq_lens, sample_rows = self.seq_lens[1], self.sample_rows[1]
        width = max(-(-(seq.num_computed_tokens + c) // bs) for seq, c in zip(seqs, counts))
        tables = self.tables_host.numpy()[: rows * width].reshape(rows, width)
        t = num_samples = num_pending = 0
        for i, (seq, count) in enumerate(zip(seqs, counts)):
            start = seq.num_computed_tokens
            end = start + count
            table = seq.block_table
            tables[i, : len(table[:width])] = table[:width]
            if count == 1:
                if start < len(seq.token_ids):
                    ids[t] = seq.token_ids[start]
                else:  # sampled by the step in flight: filled in on the device below
                    ids[t] = 0
                    self.pending_dst[1][num_pending] = t
                    self.pending_src[1][num_pending] = pending[1][id(seq)]
                    num_pending += 1
                positions[t] = start
                slots[t] = table[start // bs] * bs + start % bs
            else:
                ids[t : t + count] = seq.token_ids[start:end]
                pos = np.arange(start, end)
                positions[t : t + count] = pos
                slots[t : t + count] = tables[i, pos // bs] * bs + pos % bs
            t += count
            seq_lens[i] = end
            if batch.sample[i]:
                sample_rows[num_samples] = t - 1
                num_samples += 1
        tokens = t + (rows - n)  # padding rows are one token each (decode only)
        ids[t:tokens], positions[t:tokens], slots[t:tokens] = 0, 0, -1
        seq_lens[n:rows] = 0
        self.query_start[1][: rows + 1] = np.concatenate(([0], np.cumsum(counts), t + np.arange(1, rows - n + 1)))
        self.key_start[1][: rows + 1] = np.concatenate(([0], np.cumsum(seq_lens[:rows])))

        dev = {}
        for name, size in (("ids", tokens), ("positions", tokens), ("slots", tokens), ("seq_lens", rows),
                           ("query_start", rows + 1), ("key_start", rows + 1), ("sample_rows", num_samples),
                           ("pending_dst", num_pending), ("pending_src", num_pending)):
            host, _, device_buffer = getattr(self, name)
            device_buffer[:size].copy_(host[:size], non_blocking=True)
            dev[name] = device_buffer[:size]
        if num_pending:
            dev["ids"].index_copy_(0, dev["pending_dst"], pending[0].index_select(0, dev["pending_src"]))
        staging = self.tables_staging[: rows * width]
        staging.copy_(self.tables_host[: rows * width], non_blocking=True)
        self.block_tables[:rows, :width].copy_(staging.view(rows, width))
        meta = AttentionMetadata(
            slot_mapping=dev["slots"],
            query_start=dev["query_start"],
            seq_lens=dev["seq_lens"],
            key_start=dev["key_start"],
            block_tables=self.block_tables[:rows, :width] if pad_to is None else self.block_tables[:rows],
            max_query_len=max(counts),
            max_seq_len=int(seq_lens[:n].max()),
            query_lens_host=list(counts),
            seq_lens_host=seq_lens[:n].tolist(),
            num_decodes=leading_decodes(counts),
        )
        return dev["ids"], dev["positions"], meta, dev["sample_rows"]

    def graph_metadata(self, rows: int, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Views over the first `rows` rows of the device buffers, as a captured decode step reads them."""
        meta = AttentionMetadata(
            slot_mapping=self.slots[2][:rows],
            query_start=self.query_start[2][: rows + 1],
            seq_lens=self.seq_lens[2][:rows],
            key_start=self.key_start[2][: rows + 1],
            block_tables=self.block_tables[:rows],
            max_query_len=1,
            max_seq_len=max_seq_len,
            query_lens_host=[1] * rows,
            seq_lens_host=[max_seq_len] * rows,
            num_decodes=rows,
        )
        return self.ids[2][:rows], self.positions[2][:rows], meta
