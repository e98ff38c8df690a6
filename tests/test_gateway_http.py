"""Raw HTTP against a real `kvgate serve` process: every malformed request gets OpenAI's error shape with the
right status, type and param; the limits hold (context, body size, concurrency, header and body timeouts); a
client that leaves or stalls frees what it held; auth, CORS, /health, /info, /metrics, /tokenize; never a 500.

Three servers, started side by side once for the module (a start is ~10 s of CPU-bound imports):
- `server`: the default one, max_model_len 256;
- `auth_server`: --api-key secret, --cors-origin;
- `limited`: --max-concurrent-requests 2, 1 s header and body timeouts and a 10 kB body limit from a TOML
  preset, max_model_len 1024 (long streams), and its API key from the environment (KVGATE_API_KEY).
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

from tests.server import running_server

pytestmark = pytest.mark.usefixtures("deadline")

MAX_LEN = 256
VOCAB = 512  # the tiny tokenizer's and the tiny model's
API_KEY, ENV_KEY = "secret", "k2"
ORIGIN = "http://example.com"
LIMITS_TOML = "[server]\nheader_timeout_s = 1.0\nbody_timeout_s = 1.0\nmax_body_bytes = 10000\n"
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
DROP = object()  # a field to leave out of the request body


# -- servers and helpers --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(tiny_llama_dir, tmp_path_factory):
    toml = tmp_path_factory.mktemp("gateway_http") / "limits.toml"
    toml.write_text(LIMITS_TOML)
    model = ["--max-model-len", str(MAX_LEN)]
    specs = {
        "default": (model, None),
        "auth": (model + ["--api-key", API_KEY, "--cors-origin", ORIGIN], None),
        "limited": (["--max-model-len", "1024", "--max-concurrent-requests", "2", "--config", str(toml)],
                    {"KVGATE_API_KEY": ENV_KEY}),
    }
    contexts = {name: running_server(tiny_llama_dir, *args, env=env) for name, (args, env) in specs.items()}
    with ThreadPoolExecutor(len(contexts)) as pool:
        starts = {name: pool.submit(cm.__enter__) for name, cm in contexts.items()}
        try:
            yield {name: start.result() for name, start in starts.items()}
        finally:  # stop them side by side too; each checks its server exited 0
            stops = [pool.submit(contexts[name].__exit__, None, None, None)
                     for name, start in starts.items() if start.exception() is None]
            for stop in stops:
                stop.result()


@pytest.fixture(scope="module")
def server(servers):
    return servers["default"]


@pytest.fixture(scope="module")
def auth_server(servers):
    return servers["auth"]


@pytest.fixture(scope="module")
def limited(servers):
    return servers["limited"]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def limited_client(limited):
    with httpx.Client(base_url=limited.url, timeout=30, headers={"Authorization": f"Bearer {ENV_KEY}"}) as c:
        yield c


def body_for(path: str, served: str, /, **changes) -> dict:
    """A small valid request for the endpoint at path, with fields changed (DROP: left out)."""
    if path == CHAT:
        body = {"model": served, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    else:
        body = {"model": served, "prompt": "hi", "max_tokens": 2}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not DROP}


def assert_error(r: httpx.Response, status: int, param=..., code=...) -> dict:
    """OpenAI's error shape, exactly: {"error": {"message", "type", "param", "code"}}. Returns the error."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] == TYPES[status], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    if param is not ...:
        assert error["param"] == param, error
    if code is not ...:
        assert error["code"] == code, error
    return error


def scrape(server) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def metric(samples: dict[str, float], name: str, **labels) -> float:
    """The sample of kvgate:name with these labels (model_name added for the per-model ones); 0 if absent."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == f"kvgate:{name}" and want <= set(rest.rstrip("}").split(",")):
            return value
    return 0.0


def moved(before: dict[str, float], after: dict[str, float], name: str, **labels) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def successes(samples: dict[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("kvgate:request_success_total{"))


def wait_idle(server, timeout: float = 5.0) -> dict[str, float]:
    """Poll /metrics until the engine runs nothing, queues nothing and holds no KV block."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        state = [metric(samples, n) for n in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")]
        if state == [0.0, 0.0, 0.0]:
            return samples
        assert time.monotonic() < deadline, f"not idle after {timeout} s: running, waiting, kv usage = {state}"
        time.sleep(0.05)


def wait_running(server, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(scrape(server), "num_requests_running") == 0:
        assert time.monotonic() < deadline, "the request never started running"
        time.sleep(0.01)


def wait_client_closed(server, before: dict[str, float], timeout: float = 5.0) -> None:
    """Poll /metrics until one more response was counted as 499: the server saw the client leave."""
    deadline = time.monotonic() + timeout
    while moved(before, scrape(server), "http_responses_total", status="499") < 1:
        assert time.monotonic() < deadline, "the server never noticed the client leaving"
        time.sleep(0.02)


def connect(server) -> socket.socket:
    parts = urlsplit(server.url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def request_bytes(path: str, body: bytes, headers: dict | None = None, content_length: int | None = None) -> bytes:
    head = {"Host": "kvgate", "Content-Type": "application/json",
            "Content-Length": str(len(body) if content_length is None else content_length), **(headers or {})}
    lines = [f"POST {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, the body bytes read so far) of the response on a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection after {data!r}")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, rest


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    status, headers, body = read_head(sock)
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def closed_within(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closed the connection (reading and dropping anything it sends first)."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (socket.timeout, TimeoutError):
        raise AssertionError(f"the server kept the connection open for {timeout} s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


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


LONG = 2**100
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
    # missing
    ("model", DROP, "model"),
]
CHAT_ONLY = [
    ("messages", "hi", "messages"), ("logprobs", "yes", "logprobs"), ("messages", [], "messages"),
    ("messages", DROP, "messages"), ("messages", [{"role": "bot", "content": "x"}], "messages[0].role"),
    ("messages", [{"role": "tool", "content": "x", "tool_call_id": "c"}], "messages[0].role"),
    ("messages", [{"content": "x"}], "messages[0].role"),
    ("messages", [{"role": "user", "content": 5}], "messages[0].content"),
    ("messages", [{"role": "user", "content": None}], "messages[0].content"),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
     "messages[0].content[0].type"),
    ("top_logprobs", 2, "top_logprobs"),  # without logprobs
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tools"),
    ("tool_choice", "auto", "tool_choice"), ("response_format", {"type": "json_object"}, "response_format"),
    ("audio", {"voice": "alloy", "format": "wav"}, "audio"), ("modalities", ["text", "audio"], "modalities"),
    ("functions", [{"name": "f"}], "functions"), ("max_completion_tokens", 0, "max_completion_tokens"),
]
COMPLETIONS_ONLY = [
    ("logprobs", "yes", "logprobs"), ("logprobs", 21, "logprobs"), ("prompt", DROP, "prompt"),
    ("prompt", "", "prompt"), ("prompt", [], "prompt"), ("prompt", [[]], "prompt"), ("prompt", [5, "a"], "prompt"),
    ("prompt", [5, VOCAB], "prompt"), ("prompt", [5, -1], "prompt"), ("prompt", [5, LONG], "prompt"),
    ("prompt", 5, "prompt"), ("suffix", "x", "suffix"), ("best_of", 2, "best_of"), ("best_of", 0, "best_of"),
    ("echo", "yes", "echo"),
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
    ("temperature", b"1e400", "temperature", None), ("max_tokens", b"1e3", "max_tokens", None),
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
    (COMPLETIONS, {"echo": True, "logprobs": 1}, "echo"),
    (COMPLETIONS, {"n": 2, "best_of": 3}, "best_of"),
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


# -- context length, models -----------------------------------------------------------------------------------------

CONTEXT_CASES = [
    pytest.param(CHAT, {"max_tokens": 300}, "max_tokens", id="chat-max-tokens"),
    pytest.param(CHAT, {"max_tokens": DROP, "max_completion_tokens": 300}, "max_completion_tokens",
                 id="chat-max-completion-tokens"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": "hello " * 300}]}, "messages", id="chat-prompt"),
    pytest.param(COMPLETIONS, {"max_tokens": MAX_LEN}, "max_tokens", id="completion-max-tokens"),
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


# -- auth, CORS -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": API_KEY}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {API_KEY}"},
                                     {"Authorization": "Bearer"}, {"X-Api-Key": API_KEY}])
def test_auth_refused(auth_server, headers):
    with httpx.Client(base_url=auth_server.url, headers=headers, timeout=30) as c:
        for r in [c.get("/v1/models"), c.get(f"/v1/models/{auth_server.model}"), c.get("/info"),
                  c.post(COMPLETIONS, json=body_for(COMPLETIONS, auth_server.model)),
                  c.post(CHAT, json=body_for(CHAT, auth_server.model, stream=True)),
                  c.post(COMPLETIONS, content=b"not json"),  # the key is checked before the body is read
                  c.post("/tokenize", json={"prompt": "hi"})]:
            assert_error(r, 401, None, "invalid_api_key")
            assert API_KEY not in r.text


def test_auth_accepted(auth_server):
    with httpx.Client(base_url=auth_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == auth_server.model
        assert c.post(COMPLETIONS, json=body_for(COMPLETIONS, auth_server.model)).status_code == 200
        assert c.post(CHAT, json=body_for(CHAT, auth_server.model)).status_code == 200
        assert_error(c.post(COMPLETIONS, content=b"[1]"), 400)
    with httpx.Client(base_url=auth_server.url, timeout=30) as c:  # open without a key
        assert c.get("/health").json() == {"status": "ok"}
        assert "kvgate:http_responses_total" in c.get("/metrics").text


def test_auth_key_from_environment(limited, limited_client):
    assert limited_client.get("/v1/models").status_code == 200
    assert limited_client.post(COMPLETIONS, json=body_for(COMPLETIONS, limited.model)).status_code == 200
    for key in [None, API_KEY, "k"]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert_error(httpx.get(limited.url + "/v1/models", headers=headers), 401, None, "invalid_api_key")
    assert httpx.get(limited.url + "/health").status_code == 200


def test_cors(auth_server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(auth_server.url + CHAT, headers=preflight)  # a browser sends no key on a preflight
    assert r.status_code in (200, 204), r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.get(auth_server.url + "/health", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(auth_server.url + CHAT, headers={**preflight, "Origin": "http://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(auth_server.url + "/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


# -- overload, disconnects, timeouts --------------------------------------------------------------------------------

def open_stream(server, body: dict, headers: dict | None = None) -> socket.socket:
    """A streamed request on a raw socket, read up to its response headers (then not read further)."""
    sock = connect(server)
    sock.sendall(request_bytes(COMPLETIONS, json.dumps({**body, "stream": True}).encode(), headers))
    status, response_headers, _ = read_head(sock)
    assert status == 200 and response_headers["content-type"].startswith("text/event-stream")
    return sock


def test_overload(limited, limited_client):
    long = body_for(COMPLETIONS, limited.model, max_tokens=1000, ignore_eos=True, n=4)
    key = {"Authorization": f"Bearer {ENV_KEY}"}
    held = [open_stream(limited, long, key) for _ in range(2)]
    try:
        for path in (COMPLETIONS, CHAT):
            r = limited_client.post(path, json=body_for(path, limited.model))
            error = assert_error(r, 429, None, "overloaded")
            assert r.headers["retry-after"] == "1", r.headers
            assert "overloaded" in error["message"]
        assert limited_client.get("/health").status_code == 200  # only generation is limited
        assert limited_client.post("/tokenize", json={"prompt": "hi"}).status_code == 200
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while (r := limited_client.post(COMPLETIONS, json=body_for(COMPLETIONS, limited.model))).status_code == 429:
        assert time.monotonic() < deadline, "the closed streams still hold their slots"
        time.sleep(0.05)
    assert r.status_code == 200, r.text
    wait_idle(limited)


def test_disconnect_aborts_stream(server):
    before = scrape(server)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        body = body_for(COMPLETIONS, server.model, max_tokens=MAX_LEN - 1, ignore_eos=True, n=4, stream=True)
        with c.stream("POST", COMPLETIONS, json=body) as r:
            assert r.status_code == 200
            next(r.iter_raw())
    after = wait_idle(server)
    assert successes(after) == successes(before), "the request ran to its end: it was not aborted"


@pytest.mark.parametrize("wait", [False, True], ids=["at-once", "once-running"])
def test_disconnect_aborts_non_streamed(server, wait):
    before = scrape(server)
    body = json.dumps(body_for(COMPLETIONS, server.model, max_tokens=MAX_LEN - 1, ignore_eos=True, n=4)).encode()
    with connect(server) as sock:
        sock.sendall(request_bytes(COMPLETIONS, body))
        if wait:
            wait_running(server)
    wait_client_closed(server, before)
    after = wait_idle(server)
    assert successes(after) == successes(before), "the request ran to its end: it was not aborted"
    assert moved(before, after, "http_responses_total", status="499") == 1


def test_disconnect_mid_body(server, client):
    before = scrape(server)
    with connect(server) as sock:
        sock.sendall(request_bytes(COMPLETIONS, b'{"model": ', content_length=100))
        time.sleep(0.2)
    wait_client_closed(server, before)  # a 499, not a 500
    assert moved(before, scrape(server), "http_responses_total", status="500") == 0
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("sent", [b"", b"POST /v1/compl", b"GET /health HTTP/1.1\r\nHost: x\r\n"],
                         ids=["nothing", "half-request-line", "headers-unfinished"])
def test_header_timeout(limited, limited_client, sent):
    with connect(limited) as sock:
        sock.sendall(sent)
        assert closed_within(sock, 4.0) < 3.0
    assert limited_client.get("/v1/models").status_code == 200


def test_header_timeout_is_a_deadline(limited):
    """Trickling the headers a byte at a time does not keep the connection open (slowloris)."""
    start = time.monotonic()
    with connect(limited) as sock:
        try:
            for byte in b"GET /health HTTP/1.1\r\nHost: kvgate\r\nX-Padding: " + b"a" * 100:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
                assert time.monotonic() - start < 3.0, "still open after 3 s"
        except (BrokenPipeError, ConnectionResetError):
            pass
        else:
            raise AssertionError("the server read 100+ header bytes over 10 s")
    assert time.monotonic() - start < 3.0


def slow_body(server, path: str = COMPLETIONS) -> socket.socket:
    """A request whose body is announced as 100 bytes of which 10 are sent."""
    sock = connect(server)
    sock.sendall(request_bytes(path, b'{"model": ', {"Authorization": f"Bearer {ENV_KEY}"}, content_length=100))
    return sock


@pytest.mark.parametrize("path", [COMPLETIONS, "/tokenize"])
def test_body_timeout(limited, limited_client, path):
    start = time.monotonic()
    with slow_body(limited, path) as sock:
        status, headers, body = read_response(sock)
        elapsed = time.monotonic() - start
        assert status == 408, body
        assert 0.8 < elapsed < 3.0, elapsed
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("timeout_error", "timeout")
        # and closed: a connection left open would go on reading the rest of the body at the client's pace
        assert headers.get("connection") == "close"
        closed_within(sock, 2.0)
    assert limited_client.get("/v1/models").status_code == 200


def test_slow_clients_hold_slots_only_until_the_body_timeout(limited, limited_client):
    """Two stalled uploads fill both slots (429 meanwhile) only until their 1 s body timeout."""
    start = time.monotonic()
    stalled = [slow_body(limited) for _ in range(2)]
    try:
        time.sleep(0.2)
        assert_error(limited_client.post(COMPLETIONS, json=body_for(COMPLETIONS, limited.model)), 429)
        for sock in stalled:
            assert read_response(sock)[0] == 408
        assert time.monotonic() - start < 3.0
    finally:
        for sock in stalled:
            sock.close()
    r = limited_client.post(COMPLETIONS, json=body_for(COMPLETIONS, limited.model))
    assert r.status_code == 200, r.text


# -- health, info, metrics, tokenize --------------------------------------------------------------------------------

def test_health_and_info(client, server):
    r = client.get("/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    info = client.get("/info").json()
    assert info["model_id"] == server.model
    assert info["max_model_len"] == MAX_LEN
    assert isinstance(info["max_batch_total_tokens"], int) and info["max_batch_total_tokens"] >= MAX_LEN
    assert isinstance(info["version"], str) and info["version"]


METRIC_NAMES = ["time_to_first_token_seconds", "http_responses_total", "prefix_cache_hits_total",
                "num_preemptions_total", "request_success_total", "kv_cache_usage_perc", "prompt_tokens_total",
                "generation_tokens_total", "request_queue_time_seconds", "inter_token_latency_seconds",
                "e2e_request_latency_seconds", "request_prompt_tokens", "request_generation_tokens",
                "num_requests_waiting", "num_requests_running"]


def test_metrics(client, server):
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in METRIC_NAMES:
        assert f"kvgate:{name}" in r.text, name
    before = scrape(server)
    body = body_for(COMPLETIONS, server.model, prompt=[5, 6, 7], max_tokens=3, ignore_eos=True)
    assert client.post(COMPLETIONS, json=body).status_code == 200
    after = scrape(server)
    assert moved(before, after, "request_success_total", finished_reason="length") == 1
    assert moved(before, after, "prompt_tokens_total") == 3 and moved(before, after, "generation_tokens_total") == 3
    assert moved(before, after, "request_prompt_tokens_sum") == 3
    assert moved(before, after, "request_generation_tokens_sum") == 3
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert moved(before, after, f"{histogram}_count") == 1, histogram
    assert moved(before, after, "inter_token_latency_seconds_count") == 2
    assert moved(before, after, "http_responses_total", status="200") >= 2  # the completion and a scrape


def test_tokenize(client, server):
    r = client.post("/tokenize", json={"prompt": "hello world"})
    assert r.status_code == 200, r.text
    plain = r.json()
    assert plain["count"] == len(plain["tokens"]) > 0 and all(isinstance(t, int) for t in plain["tokens"])
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hello world"}],
                                          "model": server.model}).json()
    assert chat["count"] > plain["count"]
    r = client.post("/detokenize", json={"tokens": plain["tokens"]})
    assert r.status_code == 200 and r.json()["prompt"] == "hello world"


@pytest.mark.parametrize("path, body, status, param", [
    ("/detokenize", {"tokens": [5, VOCAB]}, 400, "tokens"),
    ("/detokenize", {"tokens": [5, LONG]}, 400, "tokens"),
    ("/detokenize", {"tokens": [5, -1]}, 400, "tokens[1]"),
    ("/detokenize", {"tokens": "5"}, 400, "tokens"),
    ("/detokenize", {}, 400, "tokens"),
    ("/detokenize", {"tokens": [5], "model": "nope"}, 404, "model"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400, "prompt"),
    ("/tokenize", {"prompt": ""}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role"),
    ("/tokenize", {"prompt": "hi", "model": "nope"}, 404, "model"),
    ("/tokenize", [1], 400, None),
])
def test_tokenize_errors(client, path, body, status, param):
    assert_error(client.post(path, json=body), status, param)


def test_tokenize_malformed(client):
    for path in ("/tokenize", "/detokenize"):
        assert_error(client.post(path, content=b"{"), 400, None, "invalid_json")
        assert_error(client.get(path), 405)


# -- last: nothing above made a server error -------------------------------------------------------------------------

def test_no_server_errors(servers):
    for name, server in servers.items():
        samples = scrape(server)
        errors = {k: v for k, v in samples.items() if k.startswith('kvgate:http_responses_total{status="5')}
        assert not errors, (name, errors)
        log = "".join(server.log)
        assert "Traceback" not in log and "ERROR" not in log, (name, log)
