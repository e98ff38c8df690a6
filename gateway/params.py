"""From a decoded request body to what the engine runs: chat messages, prompts and SamplingParams. The server's
limits are checked here, and parameters that are not implemented are refused by name, never silently ignored."""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from gateway.errors import bad_request
from gateway.limits import ServerLimits
from gateway.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    def pick(value, default):
        return default if value is None else value

    return SamplingParams(
        n=pick(req.n, 1),
        temperature=pick(req.temperature, 1.0),
        top_p=pick(req.top_p, 1.0),
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
    )


def chat_params(req: ChatCompletionRequest, limits: ServerLimits) -> SamplingParams:
    _refuse_unimplemented(req)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    _check_limits(req, limits, "top_logprobs", req.top_logprobs)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return sampling_params(req, max_tokens, logprobs)


def chat_param(req: ChatCompletionRequest, param: str | None) -> str | None:
    """The chat request's own name for a field the engine names (its errors say `prompt`, `max_tokens`)."""
    if param == "prompt":
        return "messages"
    if param == "logprobs":
        return "top_logprobs"
    if param == "max_tokens" and req.max_completion_tokens is not None:
        return "max_completion_tokens"
    return param


def completion_params(req: CompletionRequest, limits: ServerLimits) -> SamplingParams:
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    _at_most("best_of", req.best_of, limits.max_best_of)
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise bad_request("best_of must equal n: ranking completions by likelihood is not supported", "best_of")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo with logprobs is not supported: prompt logprobs are not computed", "echo")
    _check_limits(req, limits, "logprobs", req.logprobs)
    return sampling_params(req, req.max_tokens, req.logprobs)


def _check_limits(req: SamplingFields, limits: ServerLimits, logprobs_field: str, logprobs: int | None) -> None:
    _at_most("n", req.n, limits.max_n)
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stops) > limits.max_stop_sequences:
        raise bad_request(f"stop takes at most {limits.max_stop_sequences} sequences on this server, "
                          f"got {len(stops)}", "stop")
    _at_most(logprobs_field, logprobs, limits.max_top_logprobs)


def _at_most(name: str, value: int | None, limit: int) -> None:
    if value is not None and value > limit:
        raise bad_request(f"{name} must be at most {limit} on this server, got {value}", name)


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    """Messages as the chat template takes them: text content only, `developer` read as `system`."""
    messages = []
    for i, message in enumerate(req.messages):
        content = message.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"content part type {part.type!r} is not supported; only text parts are",
                                      f"messages[{i}].content[{j}].type")
            content = "".join(part.text for part in content)
        if content is None:
            if message.role != "assistant":
                raise bad_request(f"a {message.role} message needs content", f"messages[{i}].content")
            content = ""
        entry = {"role": "system" if message.role == "developer" else message.role, "content": content}
        if message.name is not None:
            entry["name"] = message.name
        messages.append(entry)
    return messages


def completion_prompts(prompt: str | list) -> list[str | list[int]]:
    """The specification's four prompt forms as a list of prompts (each text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if prompt and all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                      for p in prompt):
        return list(prompt)
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of such lists, "
                      "none of them empty", "prompt")


def _refuse_unimplemented(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise bad_request("tools are not supported yet", "tools")
    if req.tool_choice not in (None, "none"):
        raise bad_request("tool_choice other than 'none' is not supported yet", "tool_choice")
    if req.functions:
        raise bad_request("functions are not supported yet", "functions")
    if req.function_call not in (None, "none"):
        raise bad_request("function_call is not supported yet", "function_call")
    if req.response_format is not None and not (
            isinstance(req.response_format, dict) and req.response_format.get("type") == "text"):
        raise bad_request("response_format other than {'type': 'text'} is not supported yet", "response_format")
    if req.audio is not None:
        raise bad_request("audio output is not supported", "audio")
    if req.modalities and set(req.modalities) != {"text"}:
        raise bad_request("only the text modality is supported", "modalities")
