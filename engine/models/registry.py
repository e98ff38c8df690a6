"""The supported architectures, listed once: each config.json `architectures` name, the `model_type` that names
it in a config saved without `architectures`, and the class implementing it ("module:Class", imported only when
asked for, so reading the table imports no torch)."""

from __future__ import annotations

import importlib
from typing import NamedTuple


class Architecture(NamedTuple):
    model_type: str
    implementation: str  # "module:Class"


ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("llama", "engine.models.llama:LlamaForCausalLM"),
    "MistralForCausalLM": Architecture("mistral", "engine.models.llama:LlamaForCausalLM"),
    "Qwen2ForCausalLM": Architecture("qwen2", "engine.models.llama:Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": Architecture("qwen3", "engine.models.llama:Qwen3ForCausalLM"),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def architecture_of(model_type: str) -> str | None:
    """The architecture a bare `model_type` stands for, or None."""
    return next((name for name, arch in ARCHITECTURES.items() if arch.model_type == model_type), None)


def supported(architectures: list[str]) -> str | None:
    """The first of a config's `architectures` that kvgate implements, or None."""
    return next((name for name in architectures if name in ARCHITECTURES), None)


def model_class(architecture: str) -> type:
    """Our class implementing `architecture` (a name in ARCHITECTURES)."""
    module, _, cls = ARCHITECTURES[architecture].implementation.partition(":")
    return getattr(importlib.import_module(module), cls)
