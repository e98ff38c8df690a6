"""Raw HTTP against `kvgate serve`: every malformed or invalid request gets OpenAI's error shape with the right
status, type, param and code (malformed bodies, invalid fields, numbers and combinations, context length, unknown
models, Litestar's own errors, body size), the other side of each limit is accepted, and what is not HTTP at all
gets uvicorn's plain 400. The servers are the package's (see conftest.py)."""

from __future__ import annotations

import json

import pytest

from tests.gateway.http_helpers import (
    CHAT,
    COMPLETIONS,
    DROP,
    ENV_KEY,
    LONG,
    MAX_LEN,
    VOCAB,
    assert_error,
    body_for,
    closed_within,
    connect,
    moved,
    read_head,
    read_response,
    request_bytes,
    scrape,
)

pytestmark = pytest.mark.usefixtures("deadline")


# -- malformed bodies -----------------------------------------------------------------------------------------------

RAW_BODIES = [
    pytest.param(b"not json", "invalid_json", id="not-json"),
    pytest.param(b"", "invalid_json", id="empty"),
    pytest.param(b'{"model": "x", ', "invalid_json", id="truncated"),
    pytest.param(b"[1]", None, id="array"),
    pytest.param(b'"x"', None, id="string"),
    pytest.param(b"3", None, id="number"),
    pytest.param(b"null", None, id="null"),
    pytest.param(b'{"model": "\xff\xfe", "prompt": "hi", "messages": []}', "invalid_json", id="invalid-utf8"),
    pytest.param(b'{"model": "x", "stop": "ok\xc3("}', "invalid_json", id="invalid-utf8-2"),
]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("raw, code", RAW_BODIES)
def test_malformed_body(client, path, raw, code):
    assert_error(client.post(path, content=raw, headers={"Content-Type": "application/json"}), 400, None, code)


BOTH = [
    # wrong types
    ("n", "3", "n"), ("temperature", "hot", "temperature"), ("stop", 5, "stop"), ("max_tokens", 1.5, "max_tokens"),
    ("model", 3, "model"), ("seed", "1", "seed"), ("stream", "yes", "stream"), ("logit_bias", [1], "logit_bias"),
    # out of range
    ("max_tokens", -1, "max_tokens"), ("max_tokens", 0, "max_tokens"), ("max_tokens", 10**30, "max_tokens"),
    ("n", 0, "n"), ("n", 1000, "n"), ("temperature", -1, "temperature"), ("temperature", 3, "temperature"),
    ("top_p", 1.5, "top_p"), ("presence_penalty", 5, "presence_penalty"),
    ("frequency_penalty", -2.5, "frequency_penalty"), ("logit_bias", {"5": 500}, "logit_bias"),
    ("logit_bias", {"5": -101}, "logit_bias"), ("logit_bias", {str(VOCAB): 1}, "logit_bias"),
    ("logit_bias", {"x": 1}, "logit_bias"), ("stop", ["a", "b", "c", "d", "e"], "stop"),
    ("seed", 2**64, "seed"), ("seed", -(2**63) - 1, "seed"), ("top_k", -2, "top_k"),
    ("stream_options", {"include_usage": "x"}, "stream_options.include_usage"),
    ("stream_options", {"include_usage": True}, "stream_options"),  # without stream: true
    # an integer field takes an integral float, never a fractional one
    ("n", 2.5, "n"), ("n", 0.0, "n"), ("seed", 1.5, "seed"), ("seed", 2.0**63, "seed"), ("top_k", 2.5, "top_k"),
    ("min_tokens", 0.5, "min_tokens"), ("max_tokens", 1e300, "max_tokens"),
    # past OpenAI's range (the wire's), though the engine would take it
    ("temperature", 2.01, "temperature"), ("top_p", -0.1, "top_p"), ("presence_penalty", 2.01, "presence_penalty"),
    ("logit_bias", {"5": 100.5}, "logit_bias"),
    # past the engine's bounds (SamplingParams names the field)
    ("n", LONG, "n"), ("max_tokens", 2**31, "max_tokens"), ("max_tokens", LONG, "max_tokens"),
    ("top_k", 2**31, "top_k"), ("min_p", 1.5, "min_p"), ("min_p", -0.1, "min_p"),
    ("repetition_penalty", 0, "repetition_penalty"), ("repetition_penalty", 2.5, "repetition_penalty"),
    ("min_tokens", -1, "min_tokens"), ("min_tokens", 3, "min_tokens"),  # more than max_tokens (2)
    ("stop_token_ids", [-1], "stop_token_ids"), ("stop_token_ids", [2**31], "stop_token_ids"),
    ("stop", "", "stop"), ("stop", ["a", ""], "stop"), ("logit_bias", {"-1": 1}, "logit_bias"),
    # missing
    ("model", DROP, "model"),
]
CHAT_ONLY = [
    ("messages", "hi", "messages"), ("logprobs", "yes", "logprobs"), ("messages", [], "messages"),
    ("messages", DROP, "messages"), ("messages", [{"role": "bot", "content": "x"}], "messages[0].role"),
    ("messages", [{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
    ("messages", [{"content": "x"}], "messages[0].role"),
    ("messages", [{"role": "user", "content": 5}], "messages[0].content"),
    ("messages", [{"role": "user", "content": None}], "messages[0].content"),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
     "messages[0].content[0].type"),
    ("top_logprobs", 2, "top_logprobs"),  # without logprobs
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], "tools"),
    ("tool_choice", "auto", "tool_choice"), ("response_format", {"type": "json"}, "response_format"),
    ("audio", {"voice": "alloy", "format": "wav"}, "audio"), ("modalities", ["text", "audio"], "modalities"),
    ("functions", [{"name": "f"}], "functions"), ("max_completion_tokens", 0, "max_completion_tokens"),
    ("max_completion_tokens", 2**31, "max_completion_tokens"), ("max_completion_tokens", 1.5, "max_completion_tokens"),
]
COMPLETIONS_ONLY = [
    ("logprobs", "yes", "logprobs"), ("logprobs", 21, "logprobs"), ("prompt", DROP, "prompt"),
    ("prompt", "", "prompt"), ("prompt", [], "prompt"), ("prompt", [[]], "prompt"), ("prompt", [5, "a"], "prompt"),
    ("prompt", [5, VOCAB], "prompt"), ("prompt", [5, -1], "prompt"), ("prompt", [5, LONG], "prompt"),
    ("prompt", 5, "prompt"), ("suffix", "x", "suffix"), ("best_of", 2, "best_of"), ("best_of", 0, "best_of"),
    ("echo", "yes", "echo"), ("logprobs", 1.5, "logprobs"), ("best_of", 1.5, "best_of"),
    ("prompt_logprobs", 0.5, "prompt_logprobs"),
]


def _cases(path, cases):
    kind = "chat" if path == CHAT else "completion"
    return [pytest.param(path, field, value, param, id=f"{kind}-{field}={json.dumps(value)[:40]}"
                         if value is not DROP else f"{kind}-no-{field}")
            for field, value, param in cases]


@pytest.mark.parametrize("path, field, value, param", _cases(CHAT, BOTH + CHAT_ONLY)
                         + _cases(COMPLETIONS, BOTH + COMPLETIONS_ONLY))
def test_invalid_field(client, server, path, field, value, param):
    assert_error(client.post(path, json=body_for(path, server.model, **{field: value})), 400, param)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("field, literal, param, code", [
    ("temperature", b"1e400", "temperature", None), ("max_tokens", b"25e-1", "max_tokens", None),
    ("n", b"true", "n", None), ("max_tokens", b"NaN", None, "invalid_json"),
    ("temperature", b"Infinity", None, "invalid_json"), ("max_tokens", b"01", None, "invalid_json"),
])
def test_invalid_number(client, server, path, field, literal, param, code):
    """Numbers Python's json module will not write."""
    raw = json.dumps(body_for(path, server.model, **{field: "@"})).encode().replace(b'"@"', literal)
    assert_error(client.post(path, content=raw), 400, param, code)


@pytest.mark.parametrize("path, changes, param", [
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    (COMPLETIONS, {"n": 2, "best_of": 3}, "best_of"),
    (CHAT, {"logprobs": True, "top_logprobs": 1.5}, "top_logprobs"),
    (CHAT, {"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    (COMPLETIONS, {"stream": False, "stream_options": {}}, "stream_options"),
])
def test_invalid_combination(client, server, path, changes, param):
    assert_error(client.post(path, json=body_for(path, server.model, **changes)), 400, param)


@pytest.mark.parametrize("path, changes", [
    (CHAT, {"seed": 2**63 - 1}), (CHAT, {"seed": -(2**63)}), (COMPLETIONS, {"n": 2, "best_of": 2}),
    (CHAT, {"tool_choice": "none", "response_format": {"type": "text"}, "logprobs": True, "top_logprobs": 20}),
    (CHAT, {"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": None}, {"role": "user", "content": [
                             {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}),
    (COMPLETIONS, {"prompt": [[5, 6], [7]], "stop": ["a", "b", "c", "d"]}),
    (CHAT, {"temperature": 2, "top_p": 1, "presence_penalty": -2, "frequency_penalty": 2,
            "logit_bias": {"5": 100, "6": -100}, "max_completion_tokens": 2, "min_tokens": 2}),
    (COMPLETIONS, {"temperature": 0, "presence_penalty": 2, "frequency_penalty": -2, "logprobs": 20,
                   "top_k": 2**31 - 1, "min_p": 1.0, "repetition_penalty": 2.0, "stop_token_ids": [2**31 - 1]}),
    (COMPLETIONS, {"n": 128, "best_of": 128, "max_tokens": 1}),
    (CHAT, {"stream_options": None}), (COMPLETIONS, {"stream": False, "stream_options": None}),
    (CHAT, {"seed": -(2.0**63), "logprobs": True, "top_logprobs": 20.0, "max_completion_tokens": 2.0}),
    (COMPLETIONS, {"seed": 2.0**62, "top_k": 5.0, "min_tokens": 1.0, "logprobs": 0.0, "prompt_logprobs": 1.0}),
])
def test_valid_edges(client, server, path, changes):
    """The other side of each limit is accepted."""
    r = client.post(path, json=body_for(path, server.model, **changes))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_unknown_fields_ignored(client, server, path):
    extra = {"frobnicate": True, "metadata": {"a": [1, {"b": None}]}, "store": False, "prompt_cache_key": "x"}
    r = client.post(path, json=body_for(path, server.model, **extra))
    assert r.status_code == 200, r.text
    assert r.json()["object"] == ("chat.completion" if path == CHAT else "text_completion")


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_integral_floats_are_integers(client, server, path):
    """16.0, as some clients write an integer, is the integer: n 2.0 gives two choices, max_tokens 1.0 one token."""
    raw = json.dumps(body_for(path, server.model, n=2, max_tokens=1, temperature=0)).encode()
    raw = raw.replace(b'"n": 2', b'"n": 2.0').replace(b'"max_tokens": 1', b'"max_tokens": 1e0')
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 2 and body["usage"]["completion_tokens"] == 2, body


@pytest.mark.parametrize("prompt", [[5.0, 6.0], [[5.0, 6e0]]], ids=["ids", "lists-of-ids"])
def test_integral_float_token_ids(client, server, prompt):
    """JSON Schema counts 5.0 an integer: a prompt token id written so is that id (the spec fuzz found it
    refused)."""
    ints = client.post(COMPLETIONS, json=body_for(COMPLETIONS, server.model, prompt=[5, 6], temperature=0))
    floats = client.post(COMPLETIONS, json=body_for(COMPLETIONS, server.model, prompt=prompt, temperature=0))
    assert ints.status_code == floats.status_code == 200, floats.text
    assert floats.json()["choices"][0]["text"] == ints.json()["choices"][0]["text"]
    assert floats.json()["usage"] == ints.json()["usage"]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_top_p_zero_keeps_the_most_probable_token(client, server, path):
    """OpenAI's range of top_p includes 0, which leaves the most probable token alone: sampled at temperature 1,
    the greedy text (the spec fuzz found it refused: the engine's top_p is in (0, 1])."""
    def text(**changes):
        r = client.post(path, json=body_for(path, server.model, max_tokens=8, **changes))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"] if path == CHAT else choice["text"]

    assert text(temperature=1, top_p=0, seed=1) == text(temperature=1, top_p=0.0, seed=2) == text(temperature=0)


# -- context length, models -----------------------------------------------------------------------------------------

CONTEXT_CASES = [
    pytest.param(CHAT, {"max_tokens": 300}, "max_tokens", id="chat-max-tokens"),
    pytest.param(CHAT, {"max_tokens": DROP, "max_completion_tokens": 300}, "max_completion_tokens",
                 id="chat-max-completion-tokens"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": "hello " * 300}]}, "messages", id="chat-prompt"),
    pytest.param(COMPLETIONS, {"max_tokens": MAX_LEN}, "max_tokens", id="completion-max-tokens"),
    pytest.param(COMPLETIONS, {"max_tokens": 2**31 - 1}, "max_tokens", id="completion-max-tokens-engine-edge"),
    pytest.param(CHAT, {"max_completion_tokens": 2**31 - 1}, "max_completion_tokens",
                 id="chat-max-completion-tokens-engine-edge"),
    pytest.param(COMPLETIONS, {"prompt": list(range(4, 4 + MAX_LEN))}, "prompt", id="completion-prompt-fills"),
    pytest.param(COMPLETIONS, {"prompt": [[5, 6], [5] * 300]}, "prompt", id="completion-second-prompt"),
]


@pytest.mark.parametrize("path, changes, param", CONTEXT_CASES)
def test_context_length_exceeded(client, server, path, changes, param):
    error = assert_error(client.post(path, json=body_for(path, server.model, **changes)), 400, param,
                         "context_length_exceeded")
    assert "maximum context length" in error["message"] and str(MAX_LEN) in error["message"], error
    # streamed: the same 400 JSON, before any byte of a stream
    r = client.post(path, json=body_for(path, server.model, stream=True, **changes))
    assert_error(r, 400)
    assert r.json() == {"error": error}


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model(client, path, stream):
    r = client.post(path, json=body_for(path, "no-such-model", stream=stream))
    error = assert_error(r, 404, "model", "model_not_found")
    assert "no-such-model" in error["message"]


def test_models(client, server):
    r = client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [server.model]
    assert client.get(f"/v1/models/{server.model}").json()["id"] == server.model
    assert_error(client.get("/v1/models/unknown"), 404, "model", "model_not_found")
    assert_error(client.get("/v1/models/org/unknown"), 404, "model", "model_not_found")


# -- Litestar's own errors, protocol-level garbage ------------------------------------------------------------------

def test_litestar_errors_in_openai_shape(client, server, limited_client):
    before = scrape(server)
    assert_error(client.get("/nope"), 404, None, None)
    assert_error(client.post("/v1/chat/completion", json={}), 404)
    assert_error(client.get(CHAT), 405)
    assert_error(client.delete(COMPLETIONS), 405)
    assert_error(client.put("/health"), 405)
    after = scrape(server)
    # counted by the metrics although no route handler ran
    assert moved(before, after, "http_responses_total", status="404") == 2
    assert moved(before, after, "http_responses_total", status="405") == 3
    # 413 (limit 10000 bytes): announced by Content-Length, and streamed in chunks with no length
    big = json.dumps(body_for(COMPLETIONS, "x", prompt="a" * 20000)).encode()
    error = assert_error(limited_client.post(COMPLETIONS, content=big), 413)
    assert "10000" in error["message"]
    assert_error(limited_client.post(COMPLETIONS, content=iter([big[:5000], big[5000:]])), 413)
    assert_error(limited_client.post("/tokenize", content=big), 413)
    assert limited_client.get("/v1/models").status_code == 200


def test_body_too_large_closes(limited, limited_client):
    """A 413 for an announced 1 GB body closes the connection rather than read (and drop) the gigabyte."""
    with connect(limited) as sock:
        sock.sendall(request_bytes(COMPLETIONS, b'{"model": ', {"Authorization": f"Bearer {ENV_KEY}"},
                                   content_length=10**9))
        status, headers, body = read_response(sock)
        assert status == 413 and json.loads(body)["error"]["type"] == "invalid_request_error"
        assert headers.get("connection") == "close"
        closed_within(sock, 2.0)
    assert limited_client.get("/v1/models").status_code == 200


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
])
def test_malformed_http(server, client, raw):
    """uvicorn's own plain-text 400 for what is not HTTP; the server goes on serving."""
    with connect(server) as sock:
        sock.sendall(raw)
        status, _, _ = read_head(sock)
        assert status == 400
    assert client.get("/health").status_code == 200
