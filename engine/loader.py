"""Build one of our model classes and fill it from a checkpoint, or with random weights (load_format=dummy)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.layers.ops import Ops
from engine.layers.quantized import check_quantization, quantize_model
from engine.model_source import iterate_weights
from engine.models import registry


def model_class(hf_config):
    """Our class for a config that `read_model_config` accepted (it refuses the unsupported ones)."""
    return registry.model_class(registry.supported(hf_config.architectures))


def load_model(hf_config, model_dir: Path, load_format: str, dtype: torch.dtype, device: torch.device,
               max_position: int, ops: Ops, seed: int = 0, quantization: str | None = None) -> torch.nn.Module:
    """quantization: a weight format (engine/layers/quantized.py) the linear layers are converted to once their
    weights are loaded; refused before anything is read where it cannot run."""
    check_quantization(quantization, device)
    cls = model_class(hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(hf_config, max_position, ops)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        _fill_random(model, seed)
    else:
        model.load_weights(iterate_weights(model_dir))
    if quantization is not None:
        quantize_model(model, quantization)
    return model.eval()


@torch.no_grad()
def _fill_random(model: torch.nn.Module, seed: int) -> None:
    """Small random weights of the real shapes: enough to benchmark, meaningless output."""
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        else:
            param.uniform_(-0.05, 0.05)  # drawn where the parameter lives: fast even at 8B
