"""Linear layers whose weights may be packed from several checkpoint tensors (fused qkv, gate-up)."""

import torch
import torch.nn.functional as F
from torch import nn

try:
    from engine.kernels.gemv import gemv, gemv_swiglu
except ImportError:  # no triton: cuBLAS everywhere
    gemv = gemv_swiglu = None


def one_row_gemv(x: torch.Tensor) -> bool:
    """Whether x is one row on CUDA (a batch-1 decode step), which takes our GEMV kernels."""
    return gemv is not None and x.is_cuda and x.shape[0] == 1 and x.is_contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that one row on CUDA takes our GEMV kernel."""
    if one_row_gemv(x):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class PackedLinear(Linear):
    """One matmul for several projections of the same input; checkpoint shards are copied into row ranges."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes), bias)
        self.out_sizes = out_sizes
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]

    def load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard: int) -> None:
        start, size = self.offsets[shard], self.out_sizes[shard]
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard} has {tensor.shape[0]} rows, expected {size}")
        param.data[start : start + size].copy_(tensor)
