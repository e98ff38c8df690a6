"""FP8 linear layers: the representation, quantization, and the matmul dispatch.

An FP8 linear is `weight` float8_e4m3fn [N, K] (rows contiguous), `weight_scale` float32 [N] (one per output row:
weight[n] * weight_scale[n] is row n in full precision) and `input_scale`, a float32 scalar (a static activation
scale calibrated with the checkpoint) or None (activations scaled per token at run time). A checkpoint's
per-tensor scale is broadcast to the rows, so a packed qkv or gate-up layer built from shards with different
per-tensor scales keeps each shard's exact values.

`fp8_linear` picks the kernel: on the CPU (and on GPUs without FP8 tensor cores) the weight is dequantized and
multiplied in fp32 (`fp8_linear_reference`, also the kernels' oracle); one row on CUDA takes the GEMV kernel with
the row scales applied in it (weight-only: the activation stays bf16), a few rows (GEMV_ROWS) its small-batch
sibling gemv_rows; more rows quantize the activation to e4m3 per token (or with the static input scale) and run
`torch._scaled_mm` with row-wise scales (`fp8_linear_scaled_mm`). The few-row and the batched paths therefore
differ by the activation's rounding, as the bf16 GEMV and cuBLAS differ by their summation order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_TINY = torch.finfo(torch.float32).tiny
_CHUNK = 1 << 24  # elements quantized at a time: bounds the fp32 copy of a large weight (lm_head) at load
# Rows up to which CUDA takes gemv_rows (weight-only, one pass over the weight) rather than torch._scaled_mm
# (which quantizes the activation first): a first guess, to be measured (tests/kernels/test_gpu_fp8.py).
GEMV_ROWS = 8
# torch._scaled_mm's use_fast_accum (Hopper: fp8 partial sums not promoted as often; faster, slightly less exact).
SCALED_MM_FAST_ACCUM = False


@dataclass
class Fp8Weight:
    """One linear's FP8 tensors, normalized: weight e4m3 [N, K], weight_scale float32 [N], input_scale float32
    scalar or None."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.weight.dtype != FP8_DTYPE or self.weight.dim() != 2:
            raise ValueError(f"an FP8 weight is float8_e4m3fn [N, K], got {self.weight.dtype} "
                             f"{tuple(self.weight.shape)}")
        n = self.weight.shape[0]
        if self.weight_scale.dtype != torch.float32 or self.weight_scale.shape != (n,):
            raise ValueError(f"weight_scale must be float32 [{n}], got {self.weight_scale.dtype} "
                             f"{tuple(self.weight_scale.shape)}")
        if self.input_scale is not None and (self.input_scale.dtype != torch.float32 or self.input_scale.dim()):
            raise ValueError(f"input_scale must be a float32 scalar, got {self.input_scale.dtype} "
                             f"{tuple(self.input_scale.shape)}")

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Fp8Weight:
        """`--quantization fp8`: a bf16/fp32 weight quantized per output row, dynamic activations."""
        return cls(*quantize_fp8(w))

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, dtype)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K], float32 scale [N]): each row scaled so that its largest magnitude is e4m3's
    largest (448), rounded to nearest. An all-zero row gets scale 1 (its values stay 0)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8 takes a 2-D weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    q = torch.empty(n, k, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    rows = max(1, _CHUNK // max(k, 1))
    for r0 in range(0, n, rows):
        block = w[r0 : r0 + rows].float()
        amax = block.abs().amax(dim=1) if k else torch.zeros(block.shape[0], device=w.device)
        s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).clamp_(min=_TINY)
        q[r0 : r0 + rows] = (block / s[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
        scale[r0 : r0 + rows] = s
    return q, scale


def dequantize_fp8(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
    """e4m3 [N, K] and float32 [N] (or a scalar) -> weight * scale in dtype (the product taken in fp32)."""
    scale = weight_scale.float()
    if scale.dim():
        scale = scale.reshape(-1, 1)
    return (weight.float() * scale).to(dtype)


def quantize_fp8_activation(x: torch.Tensor, input_scale: torch.Tensor | None = None,
                            scale_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scale [M, 1]): with the static input_scale for every row, or per row
    (token) from its largest magnitude, at most scale_ub (fbgemm's activation_scale_ub) when given."""
    xf = x.float()
    if input_scale is not None:
        scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    else:
        amax = xf.abs().amax(dim=1, keepdim=True)
        if scale_ub is not None:
            amax = amax.clamp(max=scale_ub)
        scale = (amax / E4M3_MAX).clamp_(min=1e-12)
    return (xf / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE), scale


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantized weight.T (+ bias), in fp32, returned in x's dtype. Weight-only: the CPU path
    and the oracle of the GEMV kernel."""
    out = F.linear(x.float(), dequantize_fp8(weight, weight_scale), None if bias is None else bias.float())
    return out.to(x.dtype)


def fp8_linear_scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                         scale_ub: float | None = None) -> torch.Tensor:
    """W8A8: x [M, K] quantized to e4m3 (per token, or with the static input_scale), then torch._scaled_mm with
    row-wise scales — scale_a [M, 1], scale_b [1, N] — and the weight as its column-major second operand
    (weight.t() of the row-major [N, K]); bf16 out (the row-wise kernels' only output type) with a bf16 bias,
    cast to x's dtype. CUDA needs K and N multiples of 16 (`scaled_mm_fits`); torch runs it on the CPU too."""
    xq, scale_a = quantize_fp8_activation(x, input_scale, scale_ub)
    out = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=weight_scale.reshape(1, -1),
                           bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16,
                           use_fast_accum=SCALED_MM_FAST_ACCUM)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def fp8_linear_w8a8_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                              bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                              scale_ub: float | None = None) -> torch.Tensor:
    """What fp8_linear_scaled_mm computes, in plain fp32 torch: its oracle."""
    xq, scale_a = quantize_fp8_activation(x, input_scale, scale_ub)
    out = F.linear(xq.float() * scale_a, dequantize_fp8(weight, weight_scale), None if bias is None else bias.float())
    return out.to(x.dtype)


@functools.cache
def _fp8_tensor_cores(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)  # Ada, Hopper and later


def scaled_mm_fits(weight: torch.Tensor) -> bool:
    """torch._scaled_mm on CUDA takes K and N multiples of 16 (FP8 tensor cores are checked by fp8_path)."""
    n, k = weight.shape
    return n % 16 == 0 and k % 16 == 0


@functools.cache
def _kernels():
    try:
        from engine.kernels import gemv
    except ImportError:  # no triton
        return None
    return gemv


def fp8_path(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Which kernel fp8_linear runs for this input: 'gemv', 'gemv_rows', 'scaled_mm' or 'reference'."""
    if not x.is_cuda:
        return "reference"
    if not _fp8_tensor_cores(x.device.index or 0):  # Triton converts e4m3 on sm_89 and later only
        return "reference"
    rows = x.numel() // x.shape[-1]
    if rows == 0:
        return "reference"
    if weight.stride(1) == 1 and x.is_contiguous() and _kernels() is not None:
        if rows == 1:
            return "gemv"
        if rows <= min(GEMV_ROWS, _kernels().GEMV_ROWS_MAX):
            return "gemv_rows"
    return "scaled_mm" if scaled_mm_fits(weight) else "reference"


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
               input_scale: torch.Tensor | None = None, scale_ub: float | None = None) -> torch.Tensor:
    """x [..., K] @ (weight * weight_scale[:, None]).T + bias, in x's dtype, for an FP8 linear (module doc).
    input_scale (static) and scale_ub (fbgemm's bound on dynamic scales) apply where the activation is quantized,
    torch._scaled_mm; the weight-only paths (reference, gemv, gemv_rows) keep the activation as it is."""
    path = fp8_path(x, weight)
    if path == "reference":
        return fp8_linear_reference(x, weight, weight_scale, bias)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if path == "gemv":
        out = _kernels().gemv(x2, weight, bias, weight_scale=weight_scale)
    elif path == "gemv_rows":
        out = _kernels().gemv_rows(x2, weight, bias, weight_scale=weight_scale)
    else:
        out = fp8_linear_scaled_mm(x2.contiguous(), weight, weight_scale, bias, input_scale, scale_ub)
    return out.reshape(*lead, weight.shape[0])
