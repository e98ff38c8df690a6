"""Request headers are bounded before any body is read: in total bytes, in number and per line, each tested just
under and just over its limit (the `limited` server: 4096 bytes, 20 headers, 1024 bytes a line). Past a limit
the answer is a 431 in OpenAI's error shape and the connection closes; a 64 MiB header is refused after reading
at most the limit and one socket read, never held in memory whole."""

from __future__ import annotations

import json
import socket

import pytest

from tests.gateway.http_helpers import COMPLETIONS, ENV_KEY, HEADER_LIMITS, closed_within, connect, read_head
from tests.server import running_server

pytestmark = pytest.mark.usefixtures("deadline")


def _request(headers: dict[str, str]) -> bytes:
    head = ["GET /v1/models HTTP/1.1", "Host: kvgate", f"Authorization: Bearer {ENV_KEY}",
            *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


def _send(server, raw: bytes) -> tuple[int, dict, bytes, socket.socket]:
    sock = connect(server)
    sock.sendall(raw)
    status, headers, body = read_head(sock)
    return status, headers, body, sock


def _assert_answer(server, raw: bytes, over: bool, words: str) -> None:
    """Under the limit a 200; over it a 431 in OpenAI's error shape naming the limit, and the connection closed."""
    status, headers, body, sock = _send(server, raw)
    with sock:
        if not over:
            assert status == 200
            return
        assert status == 431
        assert headers["content-type"] == "application/json" and headers["connection"] == "close"
        body += sock.recv(65536) if len(body) < int(headers["content-length"]) else b""
        error = json.loads(body)["error"]
        assert error["code"] == "request_header_fields_too_large" and error["type"] == "invalid_request_error"
        assert words in error["message"]
        assert closed_within(sock, 3.0) < 2.0


@pytest.mark.parametrize("over", [0, 1], ids=["at-limit", "one-byte-over"])
def test_total_header_bytes(limited, over):
    # lines must stay under the per-line limit: spread the padding over several headers
    total = HEADER_LIMITS["bytes"] + over
    base = len(_request({f"X-Pad-{i}": "" for i in range(6)}))
    left, pads = total - base, {}
    for i in range(6):
        pads[f"X-Pad-{i}"] = "a" * (left // 6 + (1 if i < left % 6 else 0))
    raw = _request(pads)
    assert len(raw) == total
    _assert_answer(limited, raw, over, "4096 bytes")


@pytest.mark.parametrize("over", [0, 1], ids=["at-limit", "one-over"])
def test_header_count(limited, over):
    count = HEADER_LIMITS["count"] + over - 2  # Host and Authorization count too
    _assert_answer(limited, _request({f"X-H{i}": "1" for i in range(count)}), over, "more than 20 headers")


@pytest.mark.parametrize("over", [0, 1], ids=["at-limit", "one-byte-over"])
def test_header_line(limited, over):
    value = "a" * (HEADER_LIMITS["line"] - len("X-Long") - 2 + over)  # name + ": " counted as name + value + 2
    _assert_answer(limited, _request({"X-Long": value}), over, "1024 bytes")


def test_a_huge_header_is_refused_before_it_is_read(limited, limited_client):
    """64 MiB offered: the server answers 431 and closes having taken in a small part of it."""
    sent = 0
    with connect(limited) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: kvgate\r\nX-Huge: ")
        chunk = b"a" * 65536
        try:
            while sent < 64 * 2**20:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < 8 * 2**20, f"the server went on reading: {sent} bytes taken"
    assert limited_client.get("/v1/models").status_code == 200


def test_a_body_is_not_counted_as_headers(limited):
    """Headers near the limit followed by a body in the same packet: the body's bytes are the body's."""
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 1, "x": "b" * 5000}).encode()
    head = (f"POST {COMPLETIONS} HTTP/1.1\r\nHost: kvgate\r\nAuthorization: Bearer {ENV_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    status, headers, _, sock = _send(limited, head + body)
    with sock:
        assert status != 431


@pytest.fixture(scope="module")
def four_connections(tiny_llama_dir, tmp_path_factory):
    toml = tmp_path_factory.mktemp("connections") / "server.toml"
    toml.write_text("[server]\nmax_connections = 4\nheader_timeout_s = 5.0\n")
    with running_server(tiny_llama_dir, "--max-model-len", "256", "--config", str(toml)) as server:
        yield server


@pytest.mark.parametrize("idle, status", [(3, 200), (4, 503)], ids=["at-limit", "one-over"])
def test_open_connections(four_connections, idle, status):
    """max_connections 4: with 3 other connections open (idle) a request is served; with 4, it gets a 503 and
    its connection is closed. Idle sockets count: they are what exhausts descriptors."""
    held = [connect(four_connections) for _ in range(idle)]
    try:
        raw = b"GET /health HTTP/1.1\r\nHost: kvgate\r\n\r\n"
        got, _, _, sock = _send(four_connections, raw)
        with sock:
            assert got == status
            if status == 503:
                assert closed_within(sock, 3.0) < 2.0
    finally:
        for s in held:
            s.close()
