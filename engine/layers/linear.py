"""Linear layers whose weights may be packed from several checkpoint tensors (fused qkv, gate-up), in the model's
dtype or in a quantized format (engine/layers/quantized.py) chosen at load: every matmul goes through the layer,
so the model code is the same for every format."""

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
        self.quantized = None  # a QuantizedWeight once set_quantized has replaced `weight`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized.linear(x, self.bias)
        return linear(x, self.weight, self.bias)

    def set_quantized(self, quantized: nn.Module) -> None:
        """Take a QuantizedWeight of this layer's shape in place of the plain weight, which is freed."""
        shape = (self.out_features, self.in_features)
        if tuple(quantized.shape) != shape:
            raise ValueError(f"a quantized weight of shape {tuple(quantized.shape)} for a linear of {shape}")
        self.weight = None  # the parameter's storage goes with its last reference
        self.quantized = quantized

    @property
    def out_features(self) -> int:
        return self.weight.shape[0] if self.weight is not None else self.quantized.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] if self.weight is not None else self.quantized.shape[1]


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

    def silu_and_mul(self, x: torch.Tensor, activation) -> torch.Tensor:
        """silu(gate) * up of a gate-up layer ([gate; up] rows): at batch 1 on CUDA with a plain weight and no
        bias, one fused GEMV kernel; otherwise this layer's matmul, then `activation` (ops.silu_and_mul)."""
        if self.quantized is None and self.bias is None and one_row_gemv(x):
            return gemv_swiglu(x, self.weight)
        return activation(self(x))
