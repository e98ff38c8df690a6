"""From a decoded request body to what the engine runs: chat messages, prompts and SamplingParams. The server's
limits are checked here, and parameters that are not implemented are refused by name, never silently ignored."""

from __future__ import annotations

import json

from engine.sampling_params import SamplingParams, StructuredOutputsParams
from gateway.errors import bad_request
from gateway.limits import ServerLimits
from gateway.schemas import ChatCompletionRequest, CompletionRequest, Message, SamplingFields
from gateway.structured import output_field, requested_outputs
from gateway.tools import ToolPlan


# OpenAI's top_p 0 keeps the most probable token alone; the engine's top_p is in (0, 1], and its smallest keeps
# just that token (one ranked below the first is dropped once those above it reach top_p)
TOP_P_ZERO = 1e-30


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    structured: StructuredOutputsParams | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    def pick(value, default):
        return default if value is None else value

    return SamplingParams(
        n=pick(req.n, 1),
        temperature=pick(req.temperature, 1.0),
        top_p=pick(req.top_p, 1.0) or TOP_P_ZERO,
        top_k=pick(req.top_k, 0),
        min_p=pick(req.min_p, 0.0),
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=pick(req.min_tokens, 0),
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=pick(req.ignore_eos, False),
        presence_penalty=pick(req.presence_penalty, 0.0),
        frequency_penalty=pick(req.frequency_penalty, 0.0),
        repetition_penalty=pick(req.repetition_penalty, 1.0),
        logit_bias=req.logit_bias,
        logprobs=logprobs,
        include_stop_str_in_output=pick(req.include_stop_str_in_output, False),
        skip_special_tokens=pick(req.skip_special_tokens, True),
        structured_outputs=structured,
        prompt_logprobs=prompt_logprobs,
    )


def chat_params(req: ChatCompletionRequest, limits: ServerLimits, tools: ToolPlan | None = None) -> SamplingParams:
    """tools: the request's checked tool plan; a forced tool_choice's schema wins over response_format, which
    is about the text a turn that calls a tool never writes."""
    _refuse_unimplemented(req)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    _check_limits(req, limits, "top_logprobs", req.top_logprobs)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    structured = requested_outputs(req)
    if tools is not None and tools.forced:
        structured = tools.structured_outputs()
    return sampling_params(req, max_tokens, logprobs, structured, req.prompt_logprobs)


def chat_param(req: ChatCompletionRequest, param: str | None) -> str | None:
    """The chat request's own name for a field the engine names (its errors say `prompt`, `max_tokens`)."""
    if param == "prompt":
        return "messages"
    if param == "logprobs":
        return "top_logprobs"
    if param == "max_tokens" and req.max_completion_tokens is not None:
        return "max_completion_tokens"
    if param == "structured_outputs":
        return output_field(req)
    return param


def completion_param(req: CompletionRequest, param: str | None) -> str | None:
    """The completion request's own name for a field the engine names."""
    return output_field(req) if param == "structured_outputs" else param


def completion_params(req: CompletionRequest, limits: ServerLimits) -> SamplingParams:
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    _at_most("best_of", req.best_of, limits.max_best_of)
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise bad_request("best_of must equal n: ranking completions by likelihood is not supported", "best_of")
    _check_limits(req, limits, "logprobs", req.logprobs)
    # echo with logprobs: the prompt's tokens come first, with theirs; echo with max_tokens 0: the prompt alone
    prompt_logprobs = req.prompt_logprobs
    if req.echo and (req.logprobs is not None or req.max_tokens == 0):
        prompt_logprobs = max(prompt_logprobs or 0, req.logprobs or 0)
    return sampling_params(req, req.max_tokens, req.logprobs, requested_outputs(req), prompt_logprobs)


def _check_limits(req: SamplingFields, limits: ServerLimits, logprobs_field: str, logprobs: int | None) -> None:
    _at_most("n", req.n, limits.max_n)
    if req.stream_options is not None and not req.stream:  # as OpenAI and vLLM: options of a stream not asked for
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stops) > limits.max_stop_sequences:
        raise bad_request(f"stop takes at most {limits.max_stop_sequences} sequences on this server, "
                          f"got {len(stops)}", "stop")
    _at_most(logprobs_field, logprobs, limits.max_top_logprobs)
    _at_most("prompt_logprobs", req.prompt_logprobs, limits.max_top_logprobs)
    if req.prompt_logprobs is not None and req.stream:  # as vLLM: a stream has no place for them
        raise bad_request("prompt_logprobs are not available when streaming", "prompt_logprobs")


def _at_most(name: str, value: int | None, limit: int) -> None:
    if value is not None and value > limit:
        raise bad_request(f"{name} must be at most {limit} on this server, got {value}", name)


def chat_messages(req) -> list[dict]:
    """Messages as the chat template takes them: text content only, `developer` read as `system`, tool calls
    with their arguments as objects (what Qwen, Hermes and Llama templates render)."""
    messages = []
    for i, message in enumerate(req.messages):
        content = _text(message, i)
        if content is None:
            if message.role != "assistant":
                raise bad_request(f"a {message.role} message needs content", f"messages[{i}].content")
            content = ""
        entry = {"role": "system" if message.role == "developer" else message.role, "content": content}
        if message.name is not None:
            entry["name"] = message.name
        if message.role == "tool":
            if message.tool_call_id is None:
                raise bad_request("a tool message needs the tool_call_id of the call it answers",
                                  f"messages[{i}].tool_call_id")
            entry["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            if message.role != "assistant":
                raise bad_request("only assistant messages carry tool_calls", f"messages[{i}].tool_calls")
            entry["tool_calls"] = [_history_call(call, i, j) for j, call in enumerate(message.tool_calls)]
        messages.append(entry)
    return messages


def _text(message: Message, i: int) -> str | None:
    if not isinstance(message.content, list):
        return message.content
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise bad_request(f"content part type {part.type!r} is not supported; only text parts are",
                              f"messages[{i}].content[{j}].type")
    return "".join(part.text for part in message.content)


def _history_call(call, i: int, j: int) -> dict:
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError) as exc:
            raise bad_request(f"tool call arguments are not valid JSON: {exc}",
                              f"messages[{i}].tool_calls[{j}].function.arguments") from None
    entry = {"type": "function", "function": {"name": call.function.name, "arguments": arguments}}
    return {"id": call.id, **entry} if call.id is not None else entry


def completion_prompts(prompt: str | list) -> list[str | list[int]]:
    """The specification's four prompt forms as a list of prompts (each text or token ids). A token id may be
    an integral float (`5.0`), as for the integer fields (schemas.py): JSON Schema counts it an integer."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(_token_id(t) for t in prompt):
        return [[int(t) for t in prompt]]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if prompt and all(isinstance(p, list) and p and all(_token_id(t) for t in p) for p in prompt):
        return [[int(t) for t in p] for p in prompt]
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of such lists, "
                      "none of them empty", "prompt")


def _token_id(t) -> bool:
    return (isinstance(t, int) and not isinstance(t, bool)) or (isinstance(t, float) and t.is_integer())


def _refuse_unimplemented(req: ChatCompletionRequest) -> None:
    if req.echo not in (None, False):
        raise bad_request("echo is a completions parameter: a chat request has no prompt text to echo", "echo")
    if req.functions:
        raise bad_request("functions (deprecated) are not supported: send tools", "functions")
    if req.function_call not in (None, "none"):
        raise bad_request("function_call (deprecated) is not supported: send tool_choice", "function_call")
    if req.audio is not None:
        raise bad_request("audio output is not supported", "audio")
    if req.modalities and set(req.modalities) != {"text"}:
        raise bad_request("only the text modality is supported", "modalities")
