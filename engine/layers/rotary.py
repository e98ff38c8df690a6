"""Rotary position embedding with a precomputed cos/sin table (every rope type transformers knows)."""

import torch
from torch import nn


def rope_parameters(hf_config) -> dict:
    """The rope settings, from a transformers 5 config (`rope_parameters`) or a 4 one (`rope_theta`,
    `rope_scaling`)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def inverse_frequencies(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(hf_config)
    if params["rope_type"] == "default":
        theta = params["rope_theta"]
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    init = ROPE_INIT_FUNCTIONS.get(params["rope_type"])
    if init is None:
        known = ", ".join(ROPE_INIT_FUNCTIONS)
        raise ValueError(f"unsupported rope_type {params['rope_type']!r}; known: default, {known}")
    inv_freq, scaling = init(hf_config, "cpu")
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, head_dim: int, max_position: int) -> None:
        super().__init__()
        # Built on the CPU in float32, as transformers does, then moved to where the model is being built.
        device = torch.empty(0).device
        inv_freq, scaling = inverse_frequencies(hf_config, head_dim)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float, device="cpu"), inv_freq.cpu())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * scaling).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * scaling).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for these positions, [T, 1, head_dim]: looked up once per step, used by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)
