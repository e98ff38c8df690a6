"""FP8 checkpoints as they are published: which layout a config declares, and its tensors grouped per linear.

Layouts read (config.json's `quantization_config`):
- `quant_method: "fp8"` (vLLM / AutoFP8 / llm-compressor's older export): `<linear>.weight` F8_E4M3 [N, K],
  `<linear>.weight_scale` float32 — a scalar per tensor (or [N] / [N, 1] per channel) — and, with
  `activation_scheme: "static"`, `<linear>.input_scale` (a scalar); layers in `ignored_layers` /
  `modules_to_not_convert` stay bf16. With `weight_block_size` it is the block-wise layout (DeepSeek-V3, Qwen3-FP8,
  transformers' FineGrainedFP8: `weight_scale_inv` [N/128, K/128]), refused by name.
- `quant_method: "fbgemm_fp8"` (Meta's Llama-3.1 FP8 releases): weight_scale [N, 1], dynamic activations with an
  upper bound on their scale (`activation_scale_ub`).
- `quant_method: "compressed-tensors"`, `format: "float-quantized"` (or "naive-quantized"): one config group
  targeting Linear whose `weights` are 8-bit symmetric floats, strategy "tensor" (weight_scale [1]) or "channel"
  ([N, 1]); `input_activations` dynamic (per token), static (strategy "tensor", input_scale [1]) or null
  (weight-only; run as dynamic); `ignore` lists module names, or regexes written `re:<pattern>`.
Anything else (other methods, block or group strategies, integer types, several groups, an FP8 KV cache scheme)
is refused with an error naming the field.

`group_fp8_weights` turns a checkpoint's (name, tensor) stream into one where each FP8 linear is a single
(`<linear>.weight`, Fp8Weight) item with its scales normalized ([N] float32, input_scale a scalar), so the model's
name mapping (q_proj -> shard 0 of qkv_proj) applies unchanged; everything else passes through as it came.
A packed layer (qkv, gate-up) copies each shard's rows with `copy_fp8_rows` (or concatenates them, `pack_fp8`):
rows and their scales go to the shard's row range, and the shards' static input scales, which quantize the one
input they share, become their maximum — every shard's activation range fits in it, and with per-row weight scales
nothing has to be requantized (vLLM takes the same maximum).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from engine.fp8 import FP8_DTYPE, Fp8Weight

# Tensors of an FP8 KV cache (AutoFP8, llm-compressor): dropped, kvgate's KV cache stays in the model's dtype.
KV_SCALE_NAMES = frozenset({"k_scale", "v_scale", "kv_scale", "q_scale", "prob_scale", "output_scale"})
ZERO_POINT_NAMES = frozenset({"weight_zero_point", "input_zero_point"})  # symmetric schemes: all zero, dropped


class UnsupportedQuantizationError(ValueError):
    """A checkpoint quantized in a way kvgate does not load (the message names the field)."""


@dataclass(frozen=True)
class Fp8Scheme:
    """What an FP8 checkpoint (or `--quantization fp8`) declares. activation: "static" (input_scale tensors),
    "dynamic" (per token at run time) or "none" (weight-only in the checkpoint; run as dynamic)."""

    method: str  # "fp8", "fbgemm_fp8", "compressed-tensors" or "online"
    activation: str = "dynamic"
    weight_strategy: str = "channel"  # "tensor" or "channel": either is loaded as a scale per row
    ignore: tuple[str, ...] = ()
    activation_scale_ub: float | None = None

    @property
    def static_input(self) -> bool:
        return self.activation == "static"

    def is_ignored(self, module: str) -> bool:
        """Whether the checkpoint keeps `module` (e.g. "lm_head", "model.layers.0.mlp.down_proj") unquantized."""
        for entry in self.ignore:
            if entry.startswith("re:"):
                if re.match(entry[3:], module):
                    return True
            elif entry == module:
                return True
        return False


ONLINE_FP8 = Fp8Scheme("online")  # --quantization fp8: bf16 weights quantized per row at load (Fp8Weight.from_float)


def fp8_scheme(config) -> Fp8Scheme | None:
    """The FP8 scheme of a checkpoint: `config` is config.json as a dict, a transformers config, or the
    quantization_config dict itself. None when the checkpoint is not quantized; refused when it is, but not as
    one of the layouts above."""
    qc = config if isinstance(config, dict) and "quant_method" in config else _get(config, "quantization_config")
    if qc is None:
        return None
    if hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    method = qc.get("quant_method")
    if method == "fp8":
        return _fp8(qc)
    if method == "fbgemm_fp8":
        return Fp8Scheme("fbgemm_fp8", "dynamic", "channel", tuple(qc.get("modules_to_not_convert") or ()),
                         float(qc.get("activation_scale_ub") or 1200.0))
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    raise UnsupportedQuantizationError(
        f"quantization_config.quant_method {method!r} is not supported; kvgate loads FP8 checkpoints "
        "(quant_method fp8, fbgemm_fp8, or compressed-tensors with float 8-bit weights)")


def _get(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _refuse(field: str, value, why: str) -> UnsupportedQuantizationError:
    return UnsupportedQuantizationError(f"quantization_config.{field} {value!r}: {why}")


def _fp8(qc: dict) -> Fp8Scheme:
    if qc.get("weight_block_size") is not None:
        raise _refuse("weight_block_size", qc["weight_block_size"],
                      "block-wise FP8 (weight_scale_inv per block, DeepSeek-V3 style) is not supported; "
                      "per-tensor and per-channel FP8 are")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise _refuse("fmt", qc["fmt"], "only e4m3 FP8 weights are supported")
    activation = qc.get("activation_scheme", "dynamic")
    if activation not in ("static", "dynamic"):
        raise _refuse("activation_scheme", activation, "expected 'static' or 'dynamic'")
    ignore = [*(qc.get("ignored_layers") or ()), *(qc.get("modules_to_not_convert") or ())]
    return Fp8Scheme("fp8", activation, "tensor", tuple(ignore))


def _compressed_tensors(qc: dict) -> Fp8Scheme:
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise _refuse("format", fmt, "only the FP8 formats 'float-quantized' and 'naive-quantized' are supported")
    if qc.get("kv_cache_scheme"):
        raise _refuse("kv_cache_scheme", qc["kv_cache_scheme"], "an FP8 KV cache is not supported")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise _refuse("sparsity_config.format", sparsity["format"], "sparse checkpoints are not supported")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise _refuse("config_groups", sorted(groups), "exactly one quantization group is supported")
    (name, group), = groups.items()
    where = f"config_groups.{name}"
    targets = list(group.get("targets") or ())
    if targets != ["Linear"]:
        raise _refuse(f"{where}.targets", targets, "only the target ['Linear'] is supported")
    weights = group.get("weights") or {}
    _check_float8(weights, f"{where}.weights")
    strategy = weights.get("strategy", "tensor")
    if strategy not in ("tensor", "channel"):
        raise _refuse(f"{where}.weights.strategy", strategy,
                      "only per-tensor and per-channel FP8 weights are supported (not block or group)")
    if weights.get("dynamic"):
        raise _refuse(f"{where}.weights.dynamic", True, "weights must be quantized in the checkpoint")
    if group.get("output_activations"):
        raise _refuse(f"{where}.output_activations", group["output_activations"], "not supported")
    acts = group.get("input_activations")
    if acts is None:
        activation = "none"
    else:
        _check_float8(acts, f"{where}.input_activations")
        if acts.get("dynamic"):
            activation = "dynamic"
        elif acts.get("strategy", "tensor") == "tensor":
            activation = "static"
        else:
            raise _refuse(f"{where}.input_activations.strategy", acts["strategy"],
                          "static activation scales must be per tensor")
    return Fp8Scheme("compressed-tensors", activation, strategy, tuple(qc.get("ignore") or ()))


def _check_float8(args: dict, where: str) -> None:
    if args.get("num_bits") != 8 or args.get("type") != "float":
        raise _refuse(where, {k: args.get(k) for k in ("num_bits", "type")},
                      "only 8-bit float (FP8 e4m3) quantization is supported")
    if args.get("symmetric", True) is not True:
        raise _refuse(f"{where}.symmetric", args["symmetric"], "only symmetric FP8 is supported")


# ---- tensors -------------------------------------------------------------------------------------------

def normalize_weight_scale(scale: torch.Tensor, n: int, name: str = "weight_scale") -> torch.Tensor:
    """A checkpoint's weight scale -> float32 [n]: a per-tensor scalar ([] or [1]) broadcast to every row, a
    per-channel [n] or [n, 1] flattened."""
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return s.reshape(1).expand(n).contiguous()
    if tuple(s.shape) in ((n,), (n, 1)):
        return s.reshape(n).contiguous()
    raise UnsupportedQuantizationError(
        f"{name}: shape {tuple(scale.shape)} is neither per tensor ([] or [1]) nor per channel ([{n}] or "
        f"[{n}, 1]); block-wise scales are not supported")


def normalize_input_scale(scale: torch.Tensor, name: str = "input_scale") -> torch.Tensor:
    if scale.numel() != 1:
        raise UnsupportedQuantizationError(f"{name}: a static input scale is one value, got shape "
                                           f"{tuple(scale.shape)}")
    return scale.to(torch.float32).reshape(())


def group_fp8_weights(weights: Iterable[tuple[str, torch.Tensor]], scheme: Fp8Scheme
                      ) -> Iterator[tuple[str, torch.Tensor | Fp8Weight]]:
    """The checkpoint stream with each FP8 linear's weight, weight_scale and input_scale gathered into one
    (`<linear>.weight`, Fp8Weight) item, yielded once its last part is read (the parts of one linear may come in
    any order; a few are held meanwhile). A linear is FP8 when its weight is float8_e4m3fn. Input scales are
    kept when the scheme is static (and then required), dropped otherwise; KV-cache scales and zero zero-points
    are dropped; everything else passes through."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    plain: set[str] = set()  # linears whose weight came unquantized: a scale for them is an error
    needed = {"weight", "weight_scale"} | ({"input_scale"} if scheme.static_input else set())
    for name, tensor in weights:
        prefix, _, part = name.rpartition(".")
        if part in KV_SCALE_NAMES:
            continue
        if part in ZERO_POINT_NAMES:
            if torch.count_nonzero(tensor):
                raise UnsupportedQuantizationError(f"{name}: non-zero zero points (asymmetric) are not supported")
            continue
        if part == "weight_scale_inv":
            raise UnsupportedQuantizationError(f"{name}: block-wise FP8 scales are not supported")
        if part == "input_scale" and not scheme.static_input:
            continue  # dynamic activations: scaled per token at run time
        if part == "weight" and tensor.dtype != FP8_DTYPE:
            if prefix in pending:
                raise UnsupportedQuantizationError(f"{name}: {tensor.dtype} weight comes with FP8 scales")
            plain.add(prefix)
            yield name, tensor
            continue
        if part not in ("weight", "weight_scale", "input_scale"):
            yield name, tensor
            continue
        if prefix in plain:
            raise UnsupportedQuantizationError(f"{name}: a scale for the unquantized weight {prefix}.weight")
        group = pending.setdefault(prefix, {})
        if part in group:
            raise ValueError(f"checkpoint tensor {name!r} appears twice")
        group[part] = tensor
        if needed <= group.keys():
            yield f"{prefix}.weight", _fp8_weight(prefix, pending.pop(prefix))
    if pending:
        prefix, group = next(iter(pending.items()))
        raise ValueError(f"FP8 checkpoint incomplete: {len(pending)} linear(s) lack tensors, e.g. {prefix} has "
                         f"{sorted(group)}, lacks {sorted(needed - group.keys())}")


def _fp8_weight(prefix: str, group: dict[str, torch.Tensor]) -> Fp8Weight:
    weight = group["weight"]
    if weight.dim() != 2:
        raise ValueError(f"{prefix}.weight: an FP8 linear's weight is 2-D, got shape {tuple(weight.shape)}")
    scale = normalize_weight_scale(group["weight_scale"], weight.shape[0], f"{prefix}.weight_scale")
    inp = group.get("input_scale")
    return Fp8Weight(weight.contiguous(), scale,
                     None if inp is None else normalize_input_scale(inp, f"{prefix}.input_scale"))


def copy_fp8_rows(dst: Fp8Weight, piece: Fp8Weight, start: int) -> None:
    """Copy one shard (q, k or v; gate or up) into rows start.. of a packed layer's preallocated tensors; the
    packed input scale becomes the maximum of the shards' (start it at 0)."""
    rows, k = piece.shape
    if piece.shape[1] != dst.shape[1] or start < 0 or start + rows > dst.shape[0]:
        raise ValueError(f"shard [{rows}, {k}] at row {start} does not fit in {tuple(dst.shape)}")
    if (dst.input_scale is None) != (piece.input_scale is None):
        raise ValueError("the shards of a packed FP8 layer must all have a static input scale or none")
    dst.weight[start : start + rows].copy_(piece.weight)
    dst.weight_scale[start : start + rows].copy_(piece.weight_scale)
    if dst.input_scale is not None:
        torch.maximum(dst.input_scale, piece.input_scale.to(dst.input_scale.device), out=dst.input_scale)


def pack_fp8(pieces: Sequence[Fp8Weight]) -> Fp8Weight:
    """The shards of a packed layer, in order, as one Fp8Weight (rows concatenated, input scales maxed)."""
    inputs = [p.input_scale for p in pieces]
    if any(s is None for s in inputs) and not all(s is None for s in inputs):
        raise ValueError("the shards of a packed FP8 layer must all have a static input scale or none")
    return Fp8Weight(torch.cat([p.weight for p in pieces]), torch.cat([p.weight_scale for p in pieces]),
                     None if inputs[0] is None else torch.stack(inputs).amax())
