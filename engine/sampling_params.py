"""SamplingParams: how one request is sampled (vLLM's field names), validated at construction.

The bounds here are the engine's: what it can do, for every front door (the Python API, batch runs, HTTP). A
wire protocol may hold requests to narrower ranges of its own (the HTTP gateway: OpenAI's documented ones).
Each check raises InvalidRequestError naming its field in `param`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

MAX_N = 128  # completions per request
MAX_LOGPROBS = 20  # top alternatives per token: the KV pool is sized at warmup for a step sampling this many
MAX_TEMPERATURE = 100.0
_SEED_MAX = 2**64 - 1


@dataclass
class StructuredOutputsParams:
    """What the output must match (vLLM's names); exactly one is set. The grammar is compiled with llguidance
    when the request is submitted: one that cannot be compiled is refused then (param `structured_outputs`)."""
    json: dict | str | None = None  # a JSON schema, as a dict or its JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None  # exactly one of these strings
    grammar: str | None = None  # a Lark grammar (llguidance's dialect)

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise InvalidRequestError(f"structured_outputs needs exactly one of json, json_object, regex, choice, "
                                      f"grammar; got {kinds or 'none'}", param="structured_outputs")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidRequestError("structured_outputs.json must be a JSON schema (an object or its JSON text)",
                                      param="structured_outputs")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not (isinstance(getattr(self, name), str) and getattr(self, name)):
                raise InvalidRequestError(f"structured_outputs.{name} must be a non-empty string",
                                          param="structured_outputs")
        if self.choice is not None and not (isinstance(self.choice, list) and self.choice
                                            and all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError("structured_outputs.choice must be a non-empty list of non-empty strings",
                                      param="structured_outputs")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # number of top alternatives besides the chosen token
    # the prompt's tokens with their logprobs (the first is None), and this many top alternatives each
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only, empty text (benchmarks skip the decoding)
    # Filled by the front end: the tokens that end the request besides stop_token_ids (the model's EOS ids).
    eos_token_ids: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        _int_in("n", self.n, 1, MAX_N)
        _float_in("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _float_in("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _int_in("top_k", self.top_k, -1, 2**31 - 1)
        _float_in("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _int_in("seed", self.seed, -(2**63), _SEED_MAX)
        if self.max_tokens is not None:  # 0: the prompt's logprobs alone
            _int_in("max_tokens", self.max_tokens, 0 if self.prompt_logprobs is not None else 1, 2**31 - 1)
        _int_in("min_tokens", self.min_tokens, 0, 2**31 - 1)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
                                      param="min_tokens")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop must be a list of non-empty strings, got {s!r}", param="stop")
        if self.stop and not self.detokenize:
            raise InvalidRequestError("stop strings need detokenize=True: without text there is nothing to match "
                                      "them in", param="stop")
        self.stop_token_ids = list(self.stop_token_ids or [])
        for t in self.stop_token_ids:
            _int_in("stop_token_ids", t, 0, 2**31 - 1)
        _float_in("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _float_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _float_in("repetition_penalty", self.repetition_penalty, 0.0, 2.0, low_open=True)
        if self.logit_bias:
            self.logit_bias = {_token_key(k): v for k, v in self.logit_bias.items()}
            for v in self.logit_bias.values():
                _float_in("logit_bias", v, -100.0, 100.0)
        if self.logprobs is not None:
            _int_in("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _int_in("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        if isinstance(self.structured_outputs, dict):  # as decoded from JSON
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as exc:
                raise InvalidRequestError(f"structured_outputs: {exc}", param="structured_outputs") from None
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise InvalidRequestError("structured_outputs must be StructuredOutputsParams",
                                      param="structured_outputs")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def stop_ids(self) -> set[int]:
        """Token ids that end the request when generated (EOS unless ignored, plus stop_token_ids)."""
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids.update(self.eos_token_ids)
        return ids


def _int_in(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequestError(f"{name} must be an integer in [{low}, {high}], got {value!r}", param=name)


def _float_in(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidRequestError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}", param=name)


def _token_key(key) -> int:
    try:
        token = int(key)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
    if token < 0:
        raise InvalidRequestError(f"logit_bias keys must be token ids >= 0, got {key!r}", param="logit_bias")
    return token
