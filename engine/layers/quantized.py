"""A linear layer's weight format, chosen at load: the formats, and `quantize_model`.

A `Linear` (engine/layers/linear.py) holds either its plain `weight` parameter (the model's dtype) or a
`QuantizedWeight`: a small module owning the format's tensors (registered as buffers, so they follow the model
and show in its state) that knows how to multiply by them (`linear(x, bias)`) and how to give the weight back in
full precision (`dequantize`, for references and tests). The model code never sees the difference: every matmul
goes through the layer (`layer(x)`, `PackedLinear.silu_and_mul`).

A `WeightFormat` is one value of `EngineConfig.quantization`: where it runs (`check_device`, called before any
weight is read) and how it turns a loaded weight into its `QuantizedWeight` (`quantize`). Formats register in
FORMATS by name. A checkpoint that is already quantized (FP8 checkpoints) hands the loader a ready
QuantizedWeight instead, which the layer takes with `Linear.set_quantized`; nothing else changes.

Formats:
- "int8" (CPU): weight-only int8 with a float32 scale per output row, `torch._weight_int8pack_mm` for decode
  steps (engine/layers/int8.py).
- "fp8" (CUDA): e4m3 [N, K] with a float32 scale per row and an optional static input scale (engine/fp8.py);
  refused until it is wired in (`Fp8Format.available`).

`quantize_model` quantizes every Linear after the weights are loaded (or filled at random), except the output
head: the tied embedding / lm_head stays in the model's dtype (SKIP).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.layers.int8 import dequantize_int8, int8_linear, quantize_int8

logger = logging.getLogger("kvgate")

SKIP = ("lm_head",)  # module names left unquantized


class QuantizedWeight(nn.Module):
    """One linear's weight in a quantized format (module doc)."""

    format_name = "?"

    @property
    def shape(self) -> torch.Size:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.format_name}, shape={tuple(self.shape)}"


class Int8Weight(QuantizedWeight):
    """weight int8 [N, K], scale float32 [N]; unit_scale: bf16 ones [N], the fused kernel's scale operand."""

    format_name = "int8"

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"an int8 weight is int8 [N, K], got {weight.dtype} {tuple(weight.shape)}")
        if scale.dtype != torch.float32 or scale.shape != weight.shape[:1]:
            raise ValueError(f"scale must be float32 [{weight.shape[0]}], got {scale.dtype} {tuple(scale.shape)}")
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("unit_scale", torch.ones(weight.shape[0], dtype=torch.bfloat16, device=weight.device))

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int8Weight:
        return cls(*quantize_int8(w))

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scale, bias, self.unit_scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scale, dtype)


class WeightFormat:
    """One value of EngineConfig.quantization."""

    name = "?"
    device_types: tuple[str, ...] = ()
    available = True

    def check_device(self, device: torch.device) -> None:
        """Raise ValueError, naming the setting, where this format cannot run."""
        if not self.available:
            raise ValueError(f"quantization={self.name!r} is not available yet")
        if device.type not in self.device_types:
            raise ValueError(f"quantization={self.name!r} runs on {' or '.join(self.device_types)} only, not on "
                             f"{device.type}: {self.hint}")

    hint = ""

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        raise NotImplementedError


class Int8Format(WeightFormat):
    name = "int8"
    device_types = ("cpu",)
    hint = "on a GPU leave quantization unset (bf16)"

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        return Int8Weight.from_float(weight)


class Fp8Format(WeightFormat):
    """e4m3 weights with per-row float32 scales (engine/fp8.py); wiring it in sets `available` and `quantize`
    (an Fp8Weight wrapped in a QuantizedWeight whose linear is engine.fp8.fp8_linear)."""

    name = "fp8"
    device_types = ("cuda",)
    available = False
    hint = "on the CPU use quantization='int8'"


FORMATS: dict[str, WeightFormat] = {f.name: f for f in (Int8Format(), Fp8Format())}


def weight_format(name: str) -> WeightFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"quantization must be one of {', '.join(FORMATS)}; got {name!r}") from None


def check_quantization(name: str | None, device: torch.device) -> None:
    """Refuse, before anything is loaded, a format that cannot run on this device."""
    if name is not None:
        weight_format(name).check_device(device)


@torch.no_grad()
def quantize_model(model: nn.Module, name: str, skip: tuple[str, ...] = SKIP) -> dict:
    """Quantize every Linear of a loaded model in place (module doc); the plain weights are freed. Returns what
    was done: layers, bytes of linear weights before and after."""
    fmt = weight_format(name)
    layers, before, after = 0, 0, 0
    for module_name, module in list(model.named_modules()):
        if not hasattr(module, "set_quantized") or module.quantized is not None:  # a Linear, not yet quantized
            continue
        if any(part in skip for part in module_name.split(".")):
            continue
        before += module.weight.numel() * module.weight.element_size()
        module.set_quantized(fmt.quantize(module.weight.data))
        after += module.quantized.nbytes()
        layers += 1
    logger.info("quantization %s: %d linear layers, their weights %.1f MiB -> %.1f MiB (the output head stays "
                "unquantized)", name, layers, before / 2**20, after / 2**20)
    return {"layers": layers, "bytes_before": before, "bytes_after": after}
