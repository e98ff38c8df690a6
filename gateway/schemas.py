"""Request bodies of the OpenAI API, as msgspec structs: decoding checks every type and OpenAI's ranges (the
wire's, gateway/limits.py) and names the field that is wrong. The server's limits (n, stop, logprobs) are
checked after (params.py), and the ranges OpenAI does not set (max_tokens, the vLLM extras) by SamplingParams:
each bound in one place. Unknown fields are ignored, as the hosted API does for SDK `extra_body`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct, ValidationError

from gateway.limits import Count, Integer, LogitBias, Penalty, Seed, Temperature, TopLogprobs, TopP

# the fields typed Integer, Count, Seed or TopLogprobs: an integral float given there becomes the int
_INTEGERS = ("n", "seed", "max_tokens", "top_k", "min_tokens", "prompt_logprobs", "max_completion_tokens",
             "top_logprobs", "logprobs", "best_of")


class StreamOptions(Struct, kw_only=True):
    include_usage: bool | None = None


class ContentPart(Struct, kw_only=True):
    type: str
    text: str | None = None


class ToolCallFunction(Struct, kw_only=True):
    name: str
    arguments: str | dict[str, Any] = ""  # a JSON string on the wire; some clients send the object itself


class ToolCall(Struct, kw_only=True):
    """A call an earlier assistant turn made, as the history sends it back."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool: the call it answers


class SamplingFields(Struct, kw_only=True):
    """Fields both endpoints share, with the common extras (vLLM's names). None: the default."""
    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Count | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, LogitBias] | None = None
    max_tokens: Integer | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: Integer | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: Integer | None = None
    stop_token_ids: list[Integer] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    prompt_logprobs: TopLogprobs | None = None  # vLLM's: each prompt token's logprob and this many alternatives
    # what the output must match (gateway/structured.py checks them, naming the field)
    response_format: Any = None
    structured_outputs: Any = None  # vLLM's: {json | json_object | regex | choice | grammar}
    guided_json: dict[str, Any] | str | None = None  # vLLM's older fields
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def __post_init__(self) -> None:
        for name in _INTEGERS:
            value = getattr(self, name, None)
            if isinstance(value, float):
                setattr(self, name, _integral(value, name))
        if self.stop_token_ids is not None:
            self.stop_token_ids = _integral_list(self.stop_token_ids, "stop_token_ids")


def _integral(value: float, path: str) -> int:
    if not value.is_integer():  # msgspec's own words for it, so the error names the field
        raise ValidationError(f"Expected `int`, got `float` - at `$.{path}`")
    return int(value)


def _integral_list(values: list, name: str) -> list[int]:
    return [_integral(v, f"{name}[{i}]") if isinstance(v, float) else v for i, v in enumerate(values)]


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: Integer | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: Any = None  # checked in gateway/tools.py, naming the field
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # Not implemented: a value here is refused by name (params.py), never silently ignored.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    echo: Any = None  # a completions field: chat has no prompt text to echo


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: str | list[Any]
    max_tokens: Integer | None = 16  # the specification's default
    logprobs: TopLogprobs | None = None
    echo: bool | None = None
    best_of: Count | None = None
    suffix: str | None = None


class TokenizeRequest(Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[Message], Meta(min_length=1)] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(Struct, kw_only=True):
    model: str | None = None
    tokens: list[Annotated[int, Meta(ge=0)] | Annotated[float, Meta(ge=0)]]

    def __post_init__(self) -> None:
        self.tokens = _integral_list(self.tokens, "tokens")
