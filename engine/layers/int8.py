"""Weight-only int8 on the CPU: the representation, per-channel quantization and the matmul dispatch.

An int8 linear is `weight` int8 [N, K] (rows contiguous) and `scale` float32 [N]: weight[n] * scale[n] is row n
in full precision. Symmetric, round to nearest, each row scaled so that its largest magnitude is 127 (an
all-zero row gets scale 1). Quantizing per output row means that a packed layer (qkv, gate-up) is quantized as
one tensor and each shard keeps the scales it would have alone.

`int8_linear` picks the kernel:
- a few rows (a decode step: at most INT8PACK_MAX_ROWS) with K a multiple of 32 take
  `torch._weight_int8pack_mm`, PyTorch's fused CPU kernel (AVX-512 / AVX2), which reads the int8 weight once.
  It takes the activation in bfloat16 (in float32 it ran 4-9x slower than the float32 matmul it replaces, in
  float16 20x slower, on this project's 2-core Xeon) with scales of the same dtype, so the activation is
  rounded to bf16, the kernel runs with unit scales, and the float32 scales are applied to its output (exact
  scales, measured within a few percent of passing them rounded to bf16). Its K constraint was found by measurement: K = 8 crashed, K = 100 and
  K = 33 returned garbage; every K multiple of 32 agreed with the reference.
- more rows (prefill), other shapes, or CUDA: the weight is dequantized to the activation's dtype and
  multiplied (`int8_linear_reference`'s arithmetic), where the matmul's compute, not the weight's bytes,
  dominates and the int8 kernel was 2-9x slower than float32 at 128 rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127.0
INT8PACK_MAX_ROWS = 8  # rows up to which the fused kernel is used (decode steps of small batches)
_CHUNK = 1 << 24  # elements quantized at a time: bounds the float32 copy of a large weight at load


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 [N, K], float32 scale [N]) per output row (module doc)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_int8 takes a 2-D weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    rows = max(1, _CHUNK // max(k, 1))
    for r0 in range(0, n, rows):
        block = w[r0 : r0 + rows].float()
        amax = block.abs().amax(dim=1) if k else torch.zeros(block.shape[0], device=w.device)
        s = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
        q[r0 : r0 + rows] = torch.round(block / s[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        scale[r0 : r0 + rows] = s
    return q, scale


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 [N, K] and float32 [N] -> weight * scale[:, None] in dtype (the product taken in float32)."""
    return (weight.float() * scale.float()[:, None]).to(dtype)


def int8_linear_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequantized weight.T (+ bias) in float32, returned in x's dtype: the oracle."""
    out = F.linear(x.float(), dequantize_int8(weight, scale), None if bias is None else bias.float())
    return out.to(x.dtype)


def int8pack_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether int8_linear takes torch._weight_int8pack_mm for this input (module doc)."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (not x.is_cuda and 1 <= rows <= INT8PACK_MAX_ROWS and weight.shape[1] % 32 == 0
            and weight.is_contiguous() and weight.shape[0] > 0)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                unit_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (weight * scale[:, None]).T + bias, in x's dtype. unit_scale: bf16 ones [N], kept by the
    caller so that a decode step allocates none."""
    if not int8pack_fits(x, weight):
        w = dequantize_int8(weight, scale, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    lead, k = x.shape[:-1], x.shape[-1]
    if unit_scale is None:
        unit_scale = torch.ones(weight.shape[0], dtype=torch.bfloat16, device=weight.device)
    out = torch._weight_int8pack_mm(x.reshape(-1, k).to(torch.bfloat16).contiguous(), weight, unit_scale)
    out = out.to(torch.float32).mul_(scale)
    if bias is not None:
        out.add_(bias)
    return out.to(x.dtype).reshape(*lead, weight.shape[0])
