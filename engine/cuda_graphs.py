"""CUDA graphs for decode steps: one graph per padded batch size, each running the whole model and the
logits for that many one-token sequences. Replaying a graph costs one launch instead of one per kernel, which is
what bounds small-batch decode (a 0.6B model runs hundreds of tiny kernels per token)."""

from __future__ import annotations

import bisect
import logging
import time

import torch

from engine.step_inputs import StepInputs

logger = logging.getLogger("kvgate")


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to max_num_seqs (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, model, inputs: StepInputs, max_num_seqs: int, max_model_len: int) -> None:
        self.model = model
        self.inputs = inputs
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def padded_size(self, num_seqs: int) -> int | None:
        """The smallest captured size holding num_seqs sequences; None when there is none."""
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) else None

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        # largest first: the smaller graphs then fit inside the memory the largest one reserved
        for size in reversed(self.sizes):
            ids, positions, meta = self.inputs.graph_inputs(size, self.max_model_len)
            meta.slot_mapping.fill_(-1)  # capture writes nothing into the cache
            meta.seq_lens.fill_(1)
            self.inputs.block_tables[:size].zero_()
            self.model.compute_logits(self.model(ids, positions, meta))  # warm up (compiles, autotunes) first
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self.model.compute_logits(self.model(ids, positions, meta))
            self.graphs[size] = graph
        torch.cuda.synchronize()
        used = (before - torch.cuda.mem_get_info()[0]) / 2**30
        logger.info("CUDA graphs: %d decode batch sizes (1..%d) captured in %.1f s, %.2f GiB",
                    len(self.sizes), self.sizes[-1], time.perf_counter() - start, used)

    def replay(self, size: int) -> torch.Tensor:
        """Run the graph of this padded size over what StepInputs put in the buffers; its logits [size, V]."""
        self.graphs[size].replay()
        return self.logits[size]
