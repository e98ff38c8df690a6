"""Bodies generated from OpenAI's own spec of the two operations (tests/gateway/openai_spec, by schemathesis), sent
as raw HTTP to a real `kvgate serve` on a tiny model:

- no body, valid or not, is answered with a 5xx, and the server logs no error;
- every refusal is OpenAI's error shape, a 400 whose `param` names the field (only a body that is no JSON object
  at all has no field to name);
- a spec-valid body is answered 200 unless it asks for something kvgate refuses by name: `named_refusals` below
  (spec_refusals.py) lists every such case, and the refusal must name one of the fields it gives for that body; and spec-valid bodies
  kept clear of those (`fitted`) are all answered 200, so the answering paths are fuzzed too, not only refusals;
- a 200 stream is read to its end, which is `data: [DONE]`, with no error event;
- a valid body with one known field made invalid (wrong type, out of range) is a 400 naming that field.

The run is bounded (a fixed number of examples per test, derandomized: the same bodies every run, 25 to 50 s
here); KVGATE_FUZZ_EXAMPLES raises the count (`make fuzz`), KVGATE_FUZZ_SEED picks another fixed set of bodies.
The counts of the run are printed at its end (-s).
"""

from __future__ import annotations

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

from tests.gateway.conftest import assert_no_server_errors
from tests.gateway.http_helpers import CHAT, COMPLETIONS, TYPES, VOCAB
from tests.gateway.spec_refusals import MAX_N, UNCOMPILABLE, context_refusal, fitted, named_refusals
from tests.server import running_server

SPEC = Path(__file__).parent / "openai_spec" / "completions_ops.json"
OPERATIONS = {CHAT: "/chat/completions", COMPLETIONS: "/completions"}  # our path: the spec's (under /v1)
EXAMPLES = int(os.environ.get("KVGATE_FUZZ_EXAMPLES", "40"))  # per test (half for the fitted ones, which generate)
MAX_LEN, MAX_STOPS, MAX_TOP_LOGPROBS = 128, 4, 20  # the fuzzed server's (and MAX_N, FUZZ_TOML)
FUZZ_TOML = f"[server]\nmax_n = {MAX_N}\n"  # n (and best_of) above 2 is refused by name: requests stay cheap
CANNOT_COMPILE = ("cannot be compiled", "into one", "must be an object")  # required_schema's own: tools.py
SEED = os.environ.get("KVGATE_FUZZ_SEED") or None  # another set of bodies, as fixed; unset: derandomized, the same each run


def fuzzing(examples: int):
    """A bounded, reproducible hypothesis run of `examples` bodies."""
    def wrap(test):
        test = settings(max_examples=examples, deadline=None, derandomize=SEED is None, database=None,
                        print_blob=True, suppress_health_check=list(HealthCheck))(test)
        return test if SEED is None else seed(int(SEED))(test)
    return wrap


COUNTS: Counter = Counter()  # what the run did, printed at its end


# -- the server, the bodies, the requests -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzzed(tiny_llama_dir, tmp_path_factory):
    toml = tmp_path_factory.mktemp("spec_fuzz") / "fuzz.toml"
    toml.write_text(FUZZ_TOML)
    with running_server(tiny_llama_dir, "--max-model-len", str(MAX_LEN), "--config", str(toml)) as server:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            yield server, client
        assert_no_server_errors({"spec fuzz": server})
    print("\nspec fuzz:", dict(sorted(COUNTS.items())))


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

