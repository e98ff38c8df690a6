"""Constants and helpers of the raw-HTTP gateway tests: request bodies, OpenAI's error shape, /metrics scraping
and waiting on it, raw sockets (requests written and responses read by hand, closes timed)."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx

MAX_LEN = 256
VOCAB = 512  # the tiny tokenizer's and the tiny model's
API_KEY, ENV_KEY = "secret", "k2"
ORIGIN = "http://example.com"
LIMITS_TOML = ("[server]\nheader_timeout_s = 1.0\nbody_timeout_s = 1.0\nmax_body_bytes = 10000\n"
               "max_n = 4\nmax_stop_sequences = 2\nmax_top_logprobs = 3\n"
               "max_header_bytes = 4096\nmax_headers = 20\nmax_header_line_bytes = 1024\n")
HEADER_LIMITS = {"bytes": 4096, "count": 20, "line": 1024}  # as LIMITS_TOML sets
LIMITED = {"max_n": 4, "max_best_of": 4, "max_stop_sequences": 2, "max_top_logprobs": 3}  # as LIMITS_TOML sets
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
DROP = object()  # a field to leave out of the request body
LONG = 2**100  # far past any 64-bit integer


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
    for line in r.text.split("\n"):  # the exposition format's lines (label values may hold \r, \u2028)
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
    """Requests that ran to their end: aborts are counted under request_success too (as vLLM does), not here."""
    return sum(v for k, v in samples.items()
               if k.startswith("kvgate:request_success_total{") and 'finished_reason="abort"' not in k)


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

