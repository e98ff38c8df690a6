"""kvgate's engine: continuous batching over a paged KV cache.

The public names are imported lazily, so `import engine` (and `kvgate --help`) stays instant.
"""

_EXPORTS = {
    "EngineConfig": "engine.config",
    "SamplingParams": "engine.sampling_params",
    "StructuredOutputsParams": "engine.sampling_params",
    "LLM": "engine.llm",
    "AsyncLLM": "engine.llm",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "Logprob": "engine.outputs",
    "RequestMetrics": "engine.outputs",
    "InvalidRequestError": "engine.errors",
    "ContextTooLongError": "engine.errors",
    "EngineDeadError": "engine.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
