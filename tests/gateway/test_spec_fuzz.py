"""Bodies generated from OpenAI's own spec of the two operations (tests/gateway/openai_spec, by schemathesis), sent
as raw HTTP to a real `kvgate serve` on a tiny model:

- no body, valid or not, is answered with a 5xx, and the server logs no error;
- every refusal is OpenAI's error shape, a 400 whose `param` names the field (only a body that is no JSON object
  at all has no field to name);
- a spec-valid body is answered 200 unless it asks for something kvgate refuses by name: `named_refusals` below
  lists every such case, and the refusal must name one of the fields it gives for that body; and spec-valid bodies
  kept clear of those (`fitted`) are all answered 200, so the answering paths are fuzzed too, not only refusals;
- a 200 stream is read to its end, which is `data: [DONE]`, with no error event;
- a valid body with one known field made invalid (wrong type, out of range) is a 400 naming that field.

The run is bounded (a fixed number of examples per test, derandomized: the same bodies every run, 25 to 50 s
here); KVGATE_FUZZ_EXAMPLES raises the count (`make fuzz`), KVGATE_FUZZ_SEED picks another fixed set of bodies.
The counts of the run are printed at its end (-s).
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from tests.gateway.http_helpers import CHAT, COMPLETIONS, TYPES, VOCAB
from tests.server import running_server

SPEC = Path(__file__).parent / "openai_spec" / "completions_ops.json"
OPERATIONS = {CHAT: "/chat/completions", COMPLETIONS: "/completions"}  # our path: the spec's (under /v1)
EXAMPLES = int(os.environ.get("KVGATE_FUZZ_EXAMPLES", "40"))  # per test (half for the fitted ones, which generate)
MAX_LEN, MAX_N, MAX_STOPS, MAX_TOP_LOGPROBS = 128, 2, 4, 20  # the fuzzed server's (FUZZ_TOML)
FUZZ_TOML = f"[server]\nmax_n = {MAX_N}\n"  # n (and best_of) above 2 is refused by name: requests stay cheap
UNCOMPILABLE = "a JSON Schema the grammar engine cannot compile: "  # the refusal must say so (CANNOT_COMPILE)
CANNOT_COMPILE = ("cannot be compiled", "into one", "must be an object")  # required_schema's own: tools.py
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"  # OpenAI's names: 1 to 64 of these
INT64 = (-(2**63), 2**63 - 1)
SEED = os.environ.get("KVGATE_FUZZ_SEED") or None  # another set of bodies, as fixed; unset: derandomized, the same each run


def fuzzing(examples: int):
    """A bounded, reproducible hypothesis run of `examples` bodies."""
    def wrap(test):
        test = settings(max_examples=examples, deadline=None, derandomize=SEED is None, database=None,
                        print_blob=True, suppress_health_check=list(HealthCheck))(test)
        return test if SEED is None else seed(int(SEED))(test)
    return wrap


COUNTS: Counter = Counter()  # what the run did, printed at its end


# -- what kvgate refuses by name, on purpose --------------------------------------------------------------------

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


# -- the server, the bodies, the requests -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzzed(tiny_llama_dir, tmp_path_factory):
    toml = tmp_path_factory.mktemp("spec_fuzz") / "fuzz.toml"
    toml.write_text(FUZZ_TOML)
    with running_server(tiny_llama_dir, "--max-model-len", str(MAX_LEN), "--config", str(toml)) as server:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            yield server, client
        _assert_no_server_errors(server)
    print("\nspec fuzz:", dict(sorted(COUNTS.items())))


def _assert_no_server_errors(server) -> None:
    """No 5xx counted, no error logged. (/metrics is split at newlines only: the fuzzed bodies' unknown field names
    are label values, and may hold characters str.splitlines also breaks at.)"""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    errors = [line for line in text.split("\n") if line.startswith('kvgate:http_responses_total{status="5')]
    assert not errors, errors
    log = "".join(server.log)
    assert "Traceback" not in log and "ERROR" not in log, log


_SCHEMA = None


def bodies(path: str, mode: GenerationMode):
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = schemathesis.openapi.from_dict(json.loads(SPEC.read_text()))
    return _SCHEMA[OPERATIONS[path]]["POST"].as_strategy(generation_mode=mode).map(lambda case: case.body)


def send(server, client: httpx.Client, path: str, body, kind: str) -> tuple[int, dict | None, list[bytes]]:
    """(status, the error or None, the SSE data lines of a 200 stream), every 5xx and malformed answer failed."""
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body = {**body, "model": server.model}  # the spec's model is any string; kvgate answers for its own
    COUNTS["requests"] += 1
    COUNTS[f"{kind}: requests"] += 1
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with client.stream("POST", path, content=content,
                       headers={"Content-Type": "application/json"}) as r:
        COUNTS[f"{kind}: status {r.status_code}"] += 1
        assert r.status_code < 500, (body, r.read())
        if r.status_code != 200:
            return r.status_code, _error(r, body, kind), []
        if r.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events and events[-1] == "[DONE]", (body, events[-3:])
            for event in events[:-1]:
                assert "error" not in json.loads(event), (body, event)
            return 200, None, events
        answer = json.loads(r.read())
        assert answer["choices"] and answer["object"] in ("chat.completion", "text_completion"), answer
        return 200, None, []


def _error(r: httpx.Response, body, kind: str) -> dict:
    """OpenAI's error shape, a 400 or the 404 of an unknown model, naming its param."""
    assert r.status_code in (400, 404), (body, r.read())
    answer = json.loads(r.read())
    assert list(answer) == ["error"] and set(answer["error"]) == {"message", "type", "param", "code"}, answer
    error = answer["error"]
    assert error["type"] == TYPES[r.status_code] and isinstance(error["message"], str), error
    if error["param"] is None:  # only a body with no field to name: not JSON, or no object
        assert not isinstance(body, dict) or error["code"] == "invalid_json", (body, error)
    else:
        COUNTS[f"{kind}: refused {error['param'].split('[')[0].split('.')[0]}"] += 1
    return error


def check_valid(server, client, path: str, body: dict) -> None:
    status, error, _ = send(server, client, path, body, "valid")
    if status == 200:
        return
    if context_refusal(error):
        return
    why = named_refusals(path, body)
    assert error["param"] in why, (f"a spec-valid body refused for no named reason: {error}", body, why)
    if why[error["param"]].startswith(UNCOMPILABLE):
        assert any(words in error["message"] for words in CANNOT_COMPILE), (error, body)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS], ids=["chat", "completions"])
def test_spec_valid_bodies(fuzzed, path):
    server, client = fuzzed

    @fuzzing(EXAMPLES)
    @given(bodies(path, GenerationMode.POSITIVE))
    def run(body):
        check_valid(server, client, path, body)

    run()


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS], ids=["chat", "completions"])
def test_spec_valid_bodies_fitted(fuzzed, path):
    """Spec-valid bodies kept clear of what kvgate refuses by name (`fitted`): every one must be a 200 (but for the
    context length, which the fuzzed prompts may pass)."""
    server, client = fuzzed

    @fuzzing(max(1, EXAMPLES // 2))
    @given(bodies(path, GenerationMode.POSITIVE).map(lambda body: fitted(path, body)))
    def run(body):
        assert not set(named_refusals(path, body)) - {"tools", "response_format"}, body
        status, error, _ = send(server, client, path, body, "fitted")
        assert status == 200 or context_refusal(error), (body, error)

    run()


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS], ids=["chat", "completions"])
def test_spec_invalid_bodies(fuzzed, path):
    """schemathesis' negative bodies: no 5xx, and every refusal names its field (the checks of `send`). Some are
    answered 200: their fault lies in a field kvgate ignores (metadata, service_tier), as the hosted API's
    unknown fields are."""
    server, client = fuzzed

    @fuzzing(EXAMPLES)
    @given(bodies(path, GenerationMode.NEGATIVE))
    def run(body):
        send(server, client, path, body, "invalid")

    run()


# -- one known field made invalid -------------------------------------------------------------------------------

_SHARED = {
    "temperature": st.sampled_from(["hot", -0.1, 2.5, [], True]),
    "top_p": st.sampled_from([1.5, -0.1, "x", {}]),
    "n": st.sampled_from([0, -1, 1.5, "two", MAX_N + 1]),
    "max_tokens": st.sampled_from(["x", 1.5, -1, [], 2**70]),
    "stream": st.sampled_from(["yes", 1, [], {}]),
    "stop": st.sampled_from([5, [1], {}, [""], ["a"] * (MAX_STOPS + 1)]),
    "logit_bias": st.sampled_from([[], "x", {"1": "x"}, {"1": 101}, {"x": 1}, {str(VOCAB): 1}]),
    "seed": st.sampled_from(["s", 1.5, 2**70, []]),
    "presence_penalty": st.sampled_from([3, -2.5, "x"]),
    "frequency_penalty": st.sampled_from([3, -2.5, "x"]),
    "stream_options": st.sampled_from(["x", 1, {"include_usage": "y"}]),
    "user": st.sampled_from([5, [], {}]),
    "model": st.sampled_from([5, None, [], {}]),
}
INVALID = {
    CHAT: {**_SHARED,
           "messages": st.sampled_from([[], "hi", None, [{"role": "robot", "content": "x"}], [{"content": "x"}],
                                        [{"role": "user", "content": 5}], [{"role": "user"}],
                                        [{"role": "tool", "content": "x"}]]),
           "max_completion_tokens": st.sampled_from(["x", 1.5, -1, 0]),
           "logprobs": st.sampled_from(["x", 3, []]),
           "top_logprobs": st.sampled_from([-1, "x", MAX_TOP_LOGPROBS + 1]),
           "response_format": st.sampled_from(["json", {"type": "yaml"}, {"type": "json_schema"}, 5]),
           "tools": st.sampled_from(["x", [], [{"type": "function"}], [{"type": "function", "function": {}}]]),
           "tool_choice": st.sampled_from([5, "sometimes", {"type": "function"}]),
           "parallel_tool_calls": st.sampled_from(["x", 2, []]),
           "modalities": st.sampled_from(["text", [5]])},
    COMPLETIONS: {**_SHARED,
                  "prompt": st.sampled_from([5, None, {}, [[]], [None], [-1], [VOCAB], ""]),
                  "echo": st.sampled_from(["x", 2, []]),
                  "logprobs": st.sampled_from([-1, "x", 1.5, MAX_TOP_LOGPROBS + 1]),
                  "best_of": st.sampled_from([0, "x", 1.5, MAX_N + 1]),
                  "suffix": st.sampled_from([5, []])},
}


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS], ids=["chat", "completions"])
def test_one_field_made_invalid(fuzzed, path):
    server, client = fuzzed
    fields = INVALID[path]

    @fuzzing(EXAMPLES)
    @given(st.sampled_from(sorted(fields)).flatmap(lambda f: st.tuples(st.just(f), fields[f])),
           st.booleans())
    def run(change, stream):
        field, value = change
        if path == CHAT:
            body = {"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        else:
            body = {"model": server.model, "prompt": "hi", "max_tokens": 2}
        body.update({"stream": stream, field: value} if stream else {field: value})
        status, error, _ = send(server, client, path, body, "one field")  # a wrong model is no string: sent as it is
        assert status == 400, (body, error)
        assert error["param"] == field or error["param"].startswith((field + ".", field + "[")), (body, error)

    run()

