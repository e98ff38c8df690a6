"""Tiny FP8 checkpoints written in each published layout (from the tiny fp32 Qwen2 checkpoint: biases on qkv, an
untied lm_head), read back through the real safetensors iteration and group_fp8_weights: every linear's weight
within e4m3 rounding of the original, scales normalized to a float32 row each, shards packed into qkv / gate-up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.fp8 import E4M3_MAX, FP8_DTYPE, Fp8Weight, quantize_fp8
from engine.fp8_checkpoint import (UnsupportedQuantizationError, copy_fp8_rows, fp8_scheme, group_fp8_weights,
                                   normalize_weight_scale, pack_fp8)
from engine.model_source import iterate_weights
from tests.test_fp8 import DYNAMIC_TOKEN, STATIC_TENSOR, ct_config, e4m3_bound

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in PROJ


def quantize_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax().float() / E4M3_MAX
    return (w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE), scale


LAYOUTS = {
    # name: (quantization_config, weight strategy, static input scales, shape of the scalars it writes)
    "fp8-static": ({"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]},
                   "tensor", True, ()),
    "fp8-dynamic": ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "tensor", False, ()),
    "fbgemm": ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]},
               "channel", False, ()),
    "ct-channel-dynamic": (ct_config({"strategy": "channel"}, DYNAMIC_TOKEN)["quantization_config"],
                           "channel", False, (1,)),
    "ct-tensor-static": (ct_config({"strategy": "tensor"}, STATIC_TENSOR)["quantization_config"],
                         "tensor", True, (1,)),
}


def write_fp8_checkpoint(src: Path, dst: Path, layout: str) -> tuple[dict, dict]:
    """dst: src's checkpoint with every projection in FP8 as `layout` stores it; returns the original tensors and
    the input scales written."""
    qconfig, strategy, static, scalar_shape = LAYOUTS[layout]
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    original = load_file(src / "model.safetensors")
    tensors, input_scales = {}, {}
    for i, (name, w) in enumerate(sorted(original.items())):
        if not is_linear(name):
            tensors[name] = w
            continue
        prefix = name.removesuffix(".weight")
        if strategy == "tensor":
            q, scale = quantize_per_tensor(w)
            scale = scale.reshape(scalar_shape)
        else:
            q, scale = quantize_fp8(w)
            scale = scale.reshape(-1, 1)
        tensors[name], tensors[f"{prefix}.weight_scale"] = q, scale
        if static:
            input_scales[prefix] = torch.tensor(0.01 * (1 + i % 5))  # differ between q, k and v
            tensors[f"{prefix}.input_scale"] = input_scales[prefix].reshape(scalar_shape)
    if layout == "fp8-static":  # AutoFP8 also writes KV-cache scales; kvgate drops them
        tensors["model.layers.0.self_attn.k_proj.output_scale"] = torch.tensor(1.0)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = qconfig
    (dst / "config.json").write_text(json.dumps(config))
    return original, input_scales


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def fp8_checkpoint(request, tiny_qwen2_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fp8") / request.param
    original, input_scales = write_fp8_checkpoint(tiny_qwen2_dir, dst, request.param)
    return request.param, dst, original, input_scales


def read_back(model_dir: Path) -> tuple[object, dict]:
    scheme = fp8_scheme(json.loads((model_dir / "config.json").read_text()))
    return scheme, dict(group_fp8_weights(iterate_weights(model_dir), scheme))


def test_checkpoint_stores_f8_e4m3(fp8_checkpoint):
    _, model_dir, _, _ = fp8_checkpoint
    header_len = int.from_bytes((model_dir / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((model_dir / "model.safetensors").read_bytes()[8 : 8 + header_len])
    assert header["model.layers.0.self_attn.q_proj.weight"]["dtype"] == "F8_E4M3"


def test_read_back_within_e4m3_rounding(fp8_checkpoint):
    layout, model_dir, original, input_scales = fp8_checkpoint
    scheme, loaded = read_back(model_dir)
    assert scheme.static_input == LAYOUTS[layout][2]
    assert set(loaded) == set(original)  # scales folded into their weights, KV-cache scales dropped
    for name, w in original.items():
        got = loaded[name]
        if not is_linear(name):
            assert torch.equal(got, w), name  # norms, embeddings, biases, lm_head: untouched
            continue
        assert isinstance(got, Fp8Weight) and got.weight_scale.shape == (w.shape[0],), name
        if LAYOUTS[layout][1] == "tensor":
            assert (got.weight_scale == got.weight_scale[0]).all()  # the per-tensor scale on every row
        assert ((got.dequantize() - w).abs() <= e4m3_bound(w, got.weight_scale)).all(), name
        prefix = name.removesuffix(".weight")
        if scheme.static_input:
            assert got.input_scale.shape == () and got.input_scale == input_scales[prefix]
        else:
            assert got.input_scale is None


def test_read_back_through_transformers_config(fp8_checkpoint):
    from transformers import AutoConfig

    layout, model_dir, _, _ = fp8_checkpoint
    assert fp8_scheme(AutoConfig.from_pretrained(model_dir, local_files_only=True)).static_input == LAYOUTS[layout][2]


def test_shards_pack_into_qkv_and_gate_up(fp8_checkpoint):
    """A packed layer's rows are its shards' rows with their own scales; their static input scales take the max."""
    _, model_dir, original, input_scales = fp8_checkpoint
    scheme, loaded = read_back(model_dir)
    for packed, parts in [("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                          ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))]:
        pieces = [loaded[f"model.layers.1.{p}.weight"] for p in parts]
        rows, k = sum(p.shape[0] for p in pieces), pieces[0].shape[1]
        dst = Fp8Weight(torch.zeros(rows, k, dtype=FP8_DTYPE), torch.zeros(rows),
                        torch.zeros(()) if scheme.static_input else None)
        start = 0
        for piece in pieces:
            copy_fp8_rows(dst, piece, start)
            start += piece.shape[0]
        whole = pack_fp8(pieces)
        assert torch.equal(dst.weight.view(torch.uint8), whole.weight.view(torch.uint8))
        assert torch.equal(dst.weight_scale, whole.weight_scale)
        w = torch.cat([original[f"model.layers.1.{p}.weight"] for p in parts])
        assert ((whole.dequantize() - w).abs() <= e4m3_bound(w, whole.weight_scale)).all()
        if scheme.static_input:
            expected = max(input_scales[f"model.layers.1.{p}"] for p in parts)
            assert dst.input_scale == expected and whole.input_scale == expected


def test_copy_fp8_rows_refuses_what_does_not_fit():
    piece = Fp8Weight(*quantize_fp8(torch.randn(4, 8)))
    dst = Fp8Weight(torch.zeros(6, 8, dtype=FP8_DTYPE), torch.zeros(6))
    with pytest.raises(ValueError, match="does not fit"):
        copy_fp8_rows(dst, piece, 3)
    with pytest.raises(ValueError, match="static input scale"):
        copy_fp8_rows(Fp8Weight(dst.weight, dst.weight_scale, torch.zeros(())), piece, 0)


def test_scale_shapes_normalize_to_rows():
    for scale in (torch.tensor(0.5), torch.tensor([0.5]), torch.full((3,), 0.5), torch.full((3, 1), 0.5)):
        out = normalize_weight_scale(scale, 3)
        assert out.dtype == torch.float32 and out.shape == (3,) and (out == 0.5).all()
    with pytest.raises(UnsupportedQuantizationError, match="block-wise"):
        normalize_weight_scale(torch.ones(2, 2), 256)


def q(name: str, n: int = 4, k: int = 8):
    w, s = quantize_fp8(torch.randn(n, k))
    return [(f"{name}.weight", w), (f"{name}.weight_scale", s[:1].reshape(()))]


def test_parts_in_any_order_and_the_errors_of_a_bad_stream():
    scheme = fp8_scheme({"quant_method": "fp8", "activation_scheme": "static"})
    parts = q("a") + [("a.input_scale", torch.tensor(0.1))]
    for order in (parts, parts[::-1], [parts[1], parts[2], parts[0]]):
        (name, got), = group_fp8_weights(order, scheme)
        assert name == "a.weight" and isinstance(got, Fp8Weight) and got.input_scale == torch.tensor(0.1)
    with pytest.raises(ValueError, match=r"incomplete.*lacks \['input_scale'\]"):
        list(group_fp8_weights(q("a"), scheme))
    dynamic = fp8_scheme({"quant_method": "fp8", "activation_scheme": "dynamic"})
    (_, got), = group_fp8_weights(parts, dynamic)  # a dynamic scheme drops input scales
    assert got.input_scale is None
    with pytest.raises(UnsupportedQuantizationError, match="block-wise"):
        list(group_fp8_weights([("a.weight_scale_inv", torch.ones(1, 1))], dynamic))
    with pytest.raises(UnsupportedQuantizationError, match="unquantized"):
        list(group_fp8_weights([("a.weight", torch.ones(2, 2)), ("a.weight_scale", torch.ones(()))], dynamic))
    with pytest.raises(UnsupportedQuantizationError, match="zero points"):
        list(group_fp8_weights([("a.weight_zero_point", torch.ones(4, 1))], dynamic))
    assert list(group_fp8_weights([("a.weight_zero_point", torch.zeros(4, 1))], dynamic)) == []
