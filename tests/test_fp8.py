"""FP8 building blocks on the CPU: per-row quantization, the matmul paths against the dequantized reference, and
the checkpoint config parsing (both layouts and the refusals). Checkpoints themselves: tests/test_fp8_checkpoint.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.fp8 import (E4M3_MAX, FP8_DTYPE, Fp8Weight, dequantize_fp8, fp8_linear, fp8_linear_reference,
                        fp8_linear_scaled_mm, fp8_linear_w8a8_reference, fp8_path, quantize_fp8,
                        quantize_fp8_activation)
from engine.fp8_checkpoint import ONLINE_FP8, UnsupportedQuantizationError, fp8_scheme


def e4m3_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round to nearest e4m3: at most half a unit in the last of 3 mantissa bits (|v| / 16), or half the smallest
    subnormal step (2^-10) below the normal range, in units of the row's scale."""
    return w.abs() / 16 + scale.reshape(-1, 1) * 2.0**-10 + 1e-12


@pytest.mark.parametrize("shape", [(32, 64), (7, 300), (1, 1)])
def test_quantize_round_trip_is_within_e4m3_rounding(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=gen) * torch.logspace(-3, 2, shape[0]).reshape(-1, 1)  # rows far apart
    q, scale = quantize_fp8(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and scale.dtype == torch.float32 and scale.shape == shape[:1]
    back = dequantize_fp8(q, scale)
    assert ((back - w).abs() <= e4m3_bound(w, scale)).all()


def test_scales_are_per_output_row_and_use_the_whole_range():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.001, 0.0, -0.003], [300.0, 10.0, -900.0]])
    q, scale = quantize_fp8(w)
    torch.testing.assert_close(scale, w.abs().amax(1) / E4M3_MAX)
    assert (q.float().abs().amax(1) == E4M3_MAX).all()  # each row's largest value maps to +-448 exactly


def test_zero_rows_stay_zero_with_a_finite_scale():
    w = torch.randn(4, 16)
    w[1] = 0.0
    q, scale = quantize_fp8(w)
    assert torch.isfinite(scale).all() and scale[1] > 0
    assert (q[1].float() == 0).all() and not q.float().isnan().any()
    assert (dequantize_fp8(q, scale)[1] == 0).all()


def test_dequantize_takes_a_per_tensor_scalar_and_an_output_dtype():
    q, _ = quantize_fp8(torch.randn(8, 8))
    out = dequantize_fp8(q, torch.tensor(0.5), torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), q.float() * 0.5)


def test_fp8_weight_checks_its_tensors():
    q, s = quantize_fp8(torch.randn(8, 16))
    Fp8Weight(q, s, torch.tensor(0.1))
    with pytest.raises(ValueError, match="weight_scale"):
        Fp8Weight(q, s.reshape(8, 1))
    with pytest.raises(ValueError, match="input_scale"):
        Fp8Weight(q, s, torch.tensor([0.1]))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        Fp8Weight(q.float(), s)
    assert torch.equal(Fp8Weight.from_float(torch.ones(2, 3)).dequantize(), torch.ones(2, 3))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)])
def test_fp8_linear_on_the_cpu_is_the_dequantized_matmul(with_bias, lead):
    gen = torch.Generator().manual_seed(len(lead))
    w = torch.randn(48, 64, generator=gen)
    q, s = quantize_fp8(w)
    bias = torch.randn(48, generator=gen) if with_bias else None
    x = torch.randn(*lead, 64, generator=gen)
    assert fp8_path(x, q) == "reference"
    out = fp8_linear(x, q, s, bias)
    assert out.shape == (*lead, 48) and out.dtype == x.dtype
    torch.testing.assert_close(out, F.linear(x, dequantize_fp8(q, s), bias), atol=1e-5, rtol=1e-5)
    # and close to the unquantized layer: e4m3 weights lose about 2^-5 relative each
    assert (out - F.linear(x, w, bias)).abs().max() < 0.1 * F.linear(x, w).abs().max()


def test_fp8_linear_reference_keeps_bf16_inputs_bf16():
    q, s = quantize_fp8(torch.randn(16, 32))
    x = torch.randn(3, 32).to(torch.bfloat16)
    out = fp8_linear_reference(x, q, s)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x.float(), dequantize_fp8(q, s)), atol=0.05, rtol=0.01)


def test_activation_quantization_per_token_static_and_bounded():
    x = torch.tensor([[1.0, -4.0, 2.0], [0.0, 0.0, 0.0], [100.0, 5.0, 1.0]])
    xq, sa = quantize_fp8_activation(x)
    assert sa.shape == (3, 1) and torch.isfinite(sa).all()
    torch.testing.assert_close(sa[[0, 2], 0], torch.tensor([4.0, 100.0]) / E4M3_MAX)
    assert (xq[1].float() == 0).all()
    xq, sa = quantize_fp8_activation(x, input_scale=torch.tensor(0.05))
    assert (sa == 0.05).all() and xq.float().abs().max() == E4M3_MAX  # 100 / 0.05 saturates at 448
    _, sa = quantize_fp8_activation(x, scale_ub=10.0)
    assert sa.max() == pytest.approx(10.0 / E4M3_MAX)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_scaled_mm_path_matches_its_w8a8_reference(static, with_bias):
    """torch._scaled_mm runs on the CPU too: the row-wise call (operand layout, scale shapes, bf16 bias and out)
    is the one CUDA takes (tests/kernels/test_gpu_fp8.py checks it there)."""
    gen = torch.Generator().manual_seed(int(static) * 2 + int(with_bias))
    q, s = quantize_fp8(torch.randn(64, 128, generator=gen) * 0.05)
    x = torch.randn(6, 128, generator=gen).to(torch.bfloat16)
    bias = torch.randn(64, generator=gen).to(torch.bfloat16) if with_bias else None
    inp = x.float().abs().amax() / E4M3_MAX if static else None
    out = fp8_linear_scaled_mm(x, q, s, bias, inp)
    assert out.dtype == torch.bfloat16 and out.shape == (6, 64)
    ref = fp8_linear_w8a8_reference(x, q, s, bias, inp)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=1e-2)
    exact = F.linear(x.float(), dequantize_fp8(q, s), None if bias is None else bias.float())
    assert (out.float() - exact).abs().max() < 0.1 * exact.abs().max()  # activation rounding: a few percent


def test_scaled_mm_path_returns_the_input_dtype():
    q, s = quantize_fp8(torch.randn(32, 64))
    assert fp8_linear_scaled_mm(torch.randn(4, 64), q, s).dtype == torch.float32


# ---- config parsing --------------------------------------------------------------------------------------

def ct_config(weights=None, acts=None, **extra) -> dict:
    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                "strategy": "channel", "dynamic": False, **(weights or {})},
             "input_activations": acts, "output_activations": None}
    return {"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
                                    "quantization_status": "compressed", "config_groups": {"group_0": group},
                                    "ignore": ["lm_head", "re:.*mlp.gate$"], "kv_cache_scheme": None,
                                    "sparsity_config": {}, **extra}}


DYNAMIC_TOKEN = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
STATIC_TENSOR = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}


def test_unquantized_config_has_no_scheme():
    assert fp8_scheme({"architectures": ["LlamaForCausalLM"]}) is None


@pytest.mark.parametrize("activation", ["static", "dynamic"])
def test_fp8_method(activation):
    config = {"quantization_config": {"quant_method": "fp8", "activation_scheme": activation,
                                      "ignored_layers": ["lm_head"]}}
    scheme = fp8_scheme(config)
    assert (scheme.method, scheme.activation, scheme.static_input) == ("fp8", activation, activation == "static")
    assert scheme.is_ignored("lm_head") and not scheme.is_ignored("model.layers.0.mlp.down_proj")
    assert fp8_scheme(config["quantization_config"]) == scheme  # the quantization_config itself


def test_fp8_method_reads_a_transformers_config_object():
    class Config:  # what AutoConfig gives: quantization_config stays a dict attribute
        quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic"}

    assert fp8_scheme(Config()).activation == "dynamic"


def test_fbgemm_fp8():
    scheme = fp8_scheme({"quantization_config": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                                 "modules_to_not_convert": ["lm_head"]}})
    assert (scheme.activation, scheme.weight_strategy, scheme.activation_scale_ub) == ("dynamic", "channel", 1200.0)
    assert scheme.is_ignored("lm_head")


@pytest.mark.parametrize("acts,expected", [(DYNAMIC_TOKEN, "dynamic"), (STATIC_TENSOR, "static"), (None, "none")])
@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_compressed_tensors(acts, expected, strategy):
    scheme = fp8_scheme(ct_config({"strategy": strategy}, acts))
    assert (scheme.method, scheme.activation, scheme.weight_strategy) == ("compressed-tensors", expected, strategy)
    assert scheme.is_ignored("lm_head") and scheme.is_ignored("model.layers.3.mlp.gate")
    assert not scheme.is_ignored("model.layers.3.mlp.gate_proj")


def test_online_scheme_is_dynamic_per_channel():
    assert (ONLINE_FP8.activation, ONLINE_FP8.weight_strategy, ONLINE_FP8.static_input) == ("dynamic", "channel",
                                                                                            False)


@pytest.mark.parametrize("config,field", [
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}, "weight_block_size"),
    ({"quant_method": "fp8", "activation_scheme": "per-token"}, "activation_scheme"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt"),
    ({"quant_method": "gptq", "bits": 4}, "quant_method"),
    ({"quant_method": "awq"}, "quant_method"),
    ({"quant_method": "bitsandbytes"}, "quant_method"),
    (ct_config({"strategy": "block", "block_structure": [128, 128]}, DYNAMIC_TOKEN), "weights.strategy"),
    (ct_config({"strategy": "group", "group_size": 128}), "weights.strategy"),
    (ct_config({"type": "int", "num_bits": 8}, DYNAMIC_TOKEN), "weights"),
    (ct_config({"num_bits": 4}), "weights"),
    (ct_config({"symmetric": False}), "weights.symmetric"),
    (ct_config(acts={**STATIC_TENSOR, "strategy": "channel"}), "input_activations.strategy"),
    (ct_config(acts={**DYNAMIC_TOKEN, "type": "int"}), "input_activations"),
    (ct_config(format="pack-quantized"), "format"),
    (ct_config(format="int-quantized"), "format"),
    (ct_config(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    (ct_config(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity_config.format"),
])
def test_refusals_name_the_field(config, field):
    with pytest.raises(UnsupportedQuantizationError, match=field.replace(".", r"\.")):
        fp8_scheme(config if "quantization_config" in config else {"quantization_config": config})


def test_compressed_tensors_refuses_several_groups_and_other_targets():
    config = ct_config()
    groups = config["quantization_config"]["config_groups"]
    groups["group_1"] = dict(groups["group_0"])
    with pytest.raises(UnsupportedQuantizationError, match="config_groups"):
        fp8_scheme(config)
    config = ct_config()
    config["quantization_config"]["config_groups"]["group_0"]["targets"] = ["re:.*q_proj"]
    with pytest.raises(UnsupportedQuantizationError, match="targets"):
        fp8_scheme(config)
