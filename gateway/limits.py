"""Every bound an API request is held to, and whose bound it is.

- The engine's (engine/sampling_params.py): what the engine can do (n <= MAX_N, logprobs <= MAX_LOGPROBS,
  temperature <= MAX_TEMPERATURE, ...). They hold at every front door: the Python API, batch runs, HTTP, and
  are the only bounds of the fields OpenAI gives no range (max_tokens, top_k, min_p and the other vLLM extras).
- The wire's (the types below): OpenAI's documented ranges. The request schemas are built from them, so an HTTP
  or batch request is held to them even where the engine takes more (temperature: 2 here, 100 there). Both
  apply, so the narrower wins; where OpenAI's range has a value the engine's lacks, the gateway translates it:
  top_p = 0 (the most probable token alone) becomes a top_p so small that it keeps that token alone (params.py).
- The server's (ServerLimits): how much of n, stop sequences and top logprobs one server allows, set in its
  ServerConfig (the [server] table of a preset) and reported by /info. Each defaults to OpenAI's maximum and is
  never above the engine's. OpenAI documents at most 5 logprobs for /v1/completions; like vLLM, kvgate allows
  max_top_logprobs there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from msgspec import Meta

from engine.sampling_params import MAX_LOGPROBS, MAX_N

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]  # presence_penalty, frequency_penalty
LogitBias = Annotated[float, Meta(ge=-100.0, le=100.0)]
# Integer fields also take an integral float (16.0, as some clients write them): the schemas turn it into the int
# and refuse 16.5 by name (schemas.py). A float's bound is its own: 2**63 - 1 as a float is 2**63.
Integer = int | float
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | Annotated[float, Meta(ge=-(2**63), lt=2**63)]
Count = Annotated[int, Meta(ge=1)] | Annotated[float, Meta(ge=1)]  # n, best_of: their upper bounds are the server's
TopLogprobs = Annotated[int, Meta(ge=0)] | Annotated[float, Meta(ge=0)]  # top_logprobs, completions logprobs too

OPENAI_MAX_N = 128
OPENAI_MAX_STOP_SEQUENCES = 4
OPENAI_MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class ServerLimits:
    max_n: int = OPENAI_MAX_N  # best_of follows: it must equal n
    max_stop_sequences: int = OPENAI_MAX_STOP_SEQUENCES  # the engine has no bound of its own
    max_top_logprobs: int = OPENAI_MAX_TOP_LOGPROBS  # chat top_logprobs, completions logprobs

    def __post_init__(self) -> None:
        for name, low, high in (("max_n", 1, MAX_N), ("max_stop_sequences", 0, None),
                                ("max_top_logprobs", 0, MAX_LOGPROBS)):
            value = getattr(self, name)
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if not (is_int and low <= value and (high is None or value <= high)):
                where = f">= {low}" if high is None else f"in [{low}, {high}] (the engine's most)"
                raise ValueError(f"{name} must be an integer {where}, got {value!r}")

    @property
    def max_best_of(self) -> int:
        return self.max_n

    def info(self) -> dict[str, int]:
        """What /info reports."""
        return {"max_n": self.max_n, "max_best_of": self.max_best_of, "max_stop_sequences": self.max_stop_sequences,
                "max_top_logprobs": self.max_top_logprobs}
