"""What kvgate refuses by name on purpose, for the spec fuzz (test_spec_fuzz.py): `named_refusals` lists every
case in which a body valid under OpenAI's spec gets a 400, with the fields the refusal may name; `fitted` changes a
spec-valid body just enough to avoid them all, so it must be answered 200."""

from __future__ import annotations

import copy
import json

from tests.gateway.http_helpers import CHAT, VOCAB

MAX_N = 2  # the fuzzed server's max_n: n (and best_of) above it is refused by name
UNCOMPILABLE = "a JSON Schema the grammar engine cannot compile: "  # the refusal must say so (CANNOT_COMPILE)
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"  # OpenAI's names: 1 to 64 of these
INT64 = (-(2**63), 2**63 - 1)

def named_refusals(path: str, body: dict) -> dict[str, str]:
    """{param: why} for every field of this spec-valid body that kvgate refuses on purpose (a feature it does not
    implement, a server limit, a value the spec types but does not bound). A spec-valid body is answered 200
    unless this names something, and then its refusal names one of these params. The one list there is."""
    why: dict[str, str] = {}
    add = why.setdefault
    chat = path == CHAT
    n = _number(body.get("n"), 1)
    if n > MAX_N:
        add("n", f"n above the server's max_n ({MAX_N})")
    if body.get("stream_options") is not None and not body.get("stream"):
        add("stream_options", "stream_options without stream (as OpenAI refuses it)")
    stop = body.get("stop")
    if "" in ([stop] if isinstance(stop, str) else stop or []):
        add("stop", "an empty stop string: it would match everywhere")
    for key, value in (body.get("logit_bias") or {}).items():
        if not (key.isascii() and key.isdigit() and int(key) < VOCAB) or not -100 <= value <= 100:
            add("logit_bias", "a key that is no token id of the vocabulary, or a bias outside OpenAI's [-100, 100]")
    if body.get("seed") is not None and not INT64[0] <= body["seed"] <= INT64[1]:
        add("seed", "a seed outside int64 (the spec's bound is 2**63 written as a float)")
    length_field = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        length_field = "max_completion_tokens"
    length = body.get(length_field)
    echo_only = not chat and body.get("echo") and length == 0  # the prompt alone, with its logprobs
    if length is not None and not echo_only and not 1 <= length <= 2**31 - 1:
        add(length_field, "max_tokens below 1 (or past 2**31 - 1): nothing to generate")
    if chat:
        _chat_refusals(body, add)
    else:
        _completion_refusals(body, add, n)
    return why


def _chat_refusals(body: dict, add) -> None:
    for i, message in enumerate(body["messages"]):
        if message.get("role") == "function":
            add(f"messages[{i}].role", "function messages (deprecated): tool messages replace them")
        if isinstance(message.get("content"), list):
            for j, part in enumerate(message["content"]):
                if part.get("type") != "text":
                    add(f"messages[{i}].content[{j}].type", "content parts other than text (images, audio, files, "
                                                            "refusals)")
        for j, call in enumerate(message.get("tool_calls") or []):
            if call.get("type") != "function":
                add(f"messages[{i}].tool_calls[{j}].type", "custom tool calls in the history")
            elif not _json_text(call["function"]["arguments"]):
                add(f"messages[{i}].tool_calls[{j}].function.arguments",
                    "a history call's arguments that are no JSON: the chat template renders them as an object")
    if body.get("audio") is not None or "audio" in (body.get("modalities") or []):
        add("audio" if body.get("audio") is not None else "modalities", "audio output")
        if "audio" in (body.get("modalities") or []):
            add("modalities", "audio output")
    if body.get("functions"):
        add("functions", "functions (deprecated): send tools")
    if body.get("function_call") not in (None, "none"):
        add("function_call", "function_call (deprecated): send tool_choice")
    if body.get("top_logprobs") and not body.get("logprobs"):
        add("top_logprobs", "top_logprobs without logprobs (as OpenAI refuses it)")
    tools = body.get("tools")
    functions = [t["function"] for t in tools or [] if t.get("type") == "function"]
    names = [f["name"] for f in functions]
    if tools is not None and (not tools or len(functions) < len(tools) or len(set(names)) < len(names)
                              or not all(_name(n) for n in names)
                              or not all(_schema(f.get("parameters")) for f in functions)):
        add("tools", "tools: an empty list, custom tools, two functions of one name, a name outside "
                     "[a-zA-Z0-9_-]{1,64}, or parameters that are no JSON Schema")
    choice = body.get("tool_choice")
    if choice is not None and choice != "none":
        named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        if (isinstance(choice, dict) and choice.get("type") != "function") or not functions or (
                named is not None and named not in names):
            add("tool_choice", "tool_choice allowed_tools or custom, or one that names no given function")
    if choice == "required" or (isinstance(choice, dict) and choice.get("type") == "function"):
        add("tools", UNCOMPILABLE + "the parameter schemas of a forced tool_choice")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format["json_schema"]
        if not _name(spec["name"]) or not _schema(spec.get("schema")):
            add("response_format", "a json_schema whose name is outside [a-zA-Z0-9_-]{1,64}, or whose schema is no "
                                   "JSON Schema")
        elif spec.get("schema") is not None:
            add("response_format", UNCOMPILABLE + "a json_schema's schema")


def _completion_refusals(body: dict, add, n: int) -> None:
    prompt = body["prompt"]
    flat = prompt if isinstance(prompt, list) else [prompt]
    if not flat or any(p in (None, "", []) for p in flat) or not all(_in_vocab(p) for p in flat):
        add("prompt", "an empty prompt, or token ids outside the model's vocabulary")
    best_of = body.get("best_of")
    if best_of is not None and (best_of != n or best_of > MAX_N):
        add("best_of", "best_of other than n (ranking completions by likelihood is not implemented), 0, or above "
                       "the server's max_n")
    if body.get("suffix"):
        add("suffix", "suffix (insertion) is not implemented")


def _number(value, default):
    return default if value is None else value


def _in_vocab(p) -> bool:
    if isinstance(p, str):
        return True
    items = p if isinstance(p, list) else [p]
    return all(_in_vocab(t) if isinstance(t, list) else (t == int(t) and 0 <= t < VOCAB) for t in items)


def _json_text(text: str) -> bool:
    try:
        json.loads(text) if text.strip() else None
        return True
    except ValueError:
        return False


def _name(name) -> bool:
    return isinstance(name, str) and 1 <= len(name) <= 64 and set(name) <= set(NAME_CHARS)


def _schema(schema) -> bool:
    from jsonschema.validators import validator_for

    if schema is None:
        return True
    try:
        validator_for(schema).check_schema(schema)
        return True
    except Exception:
        return False


def fitted(path: str, body: dict) -> dict:
    """The body with each field `named_refusals` would name changed to a spec-valid value kvgate takes (or left
    out), so that the answer must be a 200: the fields that stay are fuzzed as the spec allows."""
    b = copy.deepcopy(body)
    if _number(b.get("n"), 1) > MAX_N:
        b["n"] = MAX_N
    if b.get("stream_options") is not None and not b.get("stream"):
        del b["stream_options"]
    if isinstance(b.get("stop"), list):
        b["stop"] = [s for s in b["stop"] if s] or None
    elif b.get("stop") == "":
        b["stop"] = None
    if b.get("logit_bias"):
        b["logit_bias"] = {str(sum(map(ord, k)) % VOCAB): max(-100, min(100, v)) for k, v in b["logit_bias"].items()}
    if b.get("seed") is not None:
        b["seed"] = max(INT64[0], min(INT64[1], int(b["seed"])))
    for field in ("max_tokens", "max_completion_tokens"):
        if b.get(field) is not None and not 1 <= b[field] <= 2**31 - 1:
            b[field] = None
    if path == CHAT:
        _fit_chat(b)
    else:
        prompt = b["prompt"]
        if isinstance(prompt, list) and prompt:
            b["prompt"] = [_fit_prompt(p) for p in prompt] if isinstance(prompt[0], (str, list)) else \
                _fit_prompt(prompt)
        else:
            b["prompt"] = _fit_prompt(prompt)
        if b.get("best_of") is not None:
            b["best_of"] = _number(b.get("n"), 1)
        b.pop("suffix", None)
    return b


def _fit_prompt(p):
    if isinstance(p, list):
        return [int(t) % VOCAB for t in p] or [VOCAB - 1]
    return p or "hi"


def _fit_chat(b: dict) -> None:
    messages = []
    for message in b["messages"]:
        if message["role"] == "function":
            message = {"role": "user", "content": message.get("content") or "hi"}
        if isinstance(message.get("content"), list):
            message["content"] = [part for part in message["content"] if part.get("type") == "text"] or "hi"
        calls = [c for c in message.get("tool_calls") or [] if c.get("type") == "function"]
        for call in calls:
            if not _json_text(call["function"]["arguments"]):
                call["function"]["arguments"] = "{}"
        if "tool_calls" in message:
            message["tool_calls"] = calls
        messages.append(message)
    b["messages"] = messages
    for field in ("audio", "functions", "function_call"):
        b.pop(field, None)
    if b.get("modalities"):
        b["modalities"] = ["text"]
    if b.get("top_logprobs"):
        b["logprobs"] = True
    why = named_refusals(CHAT, b)
    if "tools" in why or "tool_choice" in why:
        b.pop("tools", None)
        b.pop("tool_choice", None)
    if "response_format" in why:
        b.pop("response_format", None)


def context_refusal(error: dict) -> bool:
    """The prompt and max_tokens together do not fit the 128-token context: refused by name whatever the body."""
    return error["code"] == "context_length_exceeded" and error["param"] in (
        "messages", "prompt", "max_tokens", "max_completion_tokens")
