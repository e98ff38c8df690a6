"""Raw HTTP against `kvgate serve`: auth (a key given or from the environment) and CORS; the limits hold
(concurrency, header and body timeouts); a client that leaves or stalls frees what it held; /health, /info,
/metrics, /tokenize and /detokenize. The servers are the package's (see conftest.py)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.gateway.http_helpers import (
    API_KEY,
    CHAT,
    COMPLETIONS,
    ENV_KEY,
    LIMITED,
    LONG,
    MAX_LEN,
    ORIGIN,
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
    successes,
    wait_client_closed,
    wait_idle,
    wait_running,
)

pytestmark = pytest.mark.usefixtures("deadline")


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
    # the request limits: OpenAI's maxima by default, the preset's on the limited server
    assert {k: info[k] for k in LIMITED} == {"max_n": 128, "max_best_of": 128, "max_stop_sequences": 4,
                                             "max_top_logprobs": 20}


def test_info_reports_the_configured_limits(limited_client):
    info = limited_client.get("/info").json()
    assert {k: info[k] for k in LIMITED} == LIMITED


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("path, param, at, past", [
    (CHAT, "n", {"n": 4}, {"n": 5}),
    (COMPLETIONS, "n", {"n": 4}, {"n": 5}),
    (COMPLETIONS, "best_of", {"n": 4, "best_of": 4}, {"n": 5, "best_of": 5}),
    (CHAT, "stop", {"stop": ["x", "y"]}, {"stop": ["x", "y", "z"]}),
    (COMPLETIONS, "stop", {"stop": ["x", "y"]}, {"stop": ["x", "y", "z"]}),
    (CHAT, "top_logprobs", {"logprobs": True, "top_logprobs": 3}, {"logprobs": True, "top_logprobs": 4}),
    (COMPLETIONS, "logprobs", {"logprobs": 3}, {"logprobs": 4}),
])
def test_configured_request_limits(limited, limited_client, client, server, path, param, at, past, stream):
    """The limits of the server's preset hold at their edge; the default server takes the values past it."""
    r = limited_client.post(path, json=body_for(path, limited.model, stream=stream, **at))
    assert r.status_code == 200, r.text
    error = assert_error(limited_client.post(path, json=body_for(path, limited.model, stream=stream, **past)), 400,
                         param, None)
    assert "on this server" in error["message"], error
    r = client.post(path, json=body_for(path, server.model, stream=stream, **past))
    assert r.status_code == 200, r.text


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
