"""The paged KV cache: its size per token, how many blocks fit, and the tensors themselves."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("kvgate")

GiB = 2**30


def bytes_per_block(model, dtype: torch.dtype, block_size: int) -> int:
    layers = model.attention_layers()
    first = layers[0]
    return 2 * len(layers) * first.num_kv_heads * first.head_dim * dtype.itemsize * block_size


def cuda_kv_budget(device: torch.device, utilization: float, activation: int, graphs: int) -> tuple[int, str]:
    """Bytes left for the KV cache once what is in use now (weights, the CUDA context, other processes), the
    worst step's activations and the CUDA graphs' memory are taken from utilization × total. Also returns the
    accounting, for the log and for the error when nothing is left."""
    free, total = torch.cuda.mem_get_info(device)
    weights = torch.cuda.memory_allocated(device)
    in_use = total - free
    budget = int(total * utilization - in_use - activation - graphs)
    accounting = (f"{total / GiB:.2f} GiB × gpu_memory_utilization {utilization} = "
                  f"{total * utilization / GiB:.2f} GiB; in use {in_use / GiB:.2f} GiB (weights "
                  f"{weights / GiB:.2f} GiB, the rest CUDA context and other processes), worst-step activations "
                  f"{activation / GiB:.2f} GiB, CUDA graphs {graphs / GiB:.2f} GiB; left for the KV cache "
                  f"{max(budget, 0) / GiB:.2f} GiB")
    return budget, accounting


def allocate(model, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device, backend) -> None:
    """One K and one V tensor per layer, [num_blocks, block_size, kv_heads, head_dim], bound to the layer."""
    layers = model.attention_layers()
    shape = (num_blocks, block_size, layers[0].num_kv_heads, layers[0].head_dim)
    for layer in layers:
        layer.k_cache = layer.v_cache = None  # drop a previous (profiling) cache before allocating
    for layer in layers:
        layer.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        layer.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        layer.backend = backend
