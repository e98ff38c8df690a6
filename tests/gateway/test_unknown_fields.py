"""Unknown top-level request fields: ignored, but each name logged once per endpoint and counted in
kvgate:unknown_request_fields_total, with the names a client can make bounded (gateway/fields.py)."""

from __future__ import annotations

import logging
import time

import msgspec
import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway.fields import MAX_NAME_CHARS, MAX_NAMES, OTHER, UnknownFields
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from tests.gateway.http_helpers import CHAT, COMPLETIONS, body_for, metric, moved, scrape


def _logged(server, needle: str, want: int, timeout: float = 5.0) -> list[str]:
    """The server's log lines containing needle, once there are want of them (the log is read by a thread)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in server.log if needle in line]
        if len(lines) >= want or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_unknown_fields_logged_once_and_counted(client, server):
    before = scrape(server)
    for path, times in ((CHAT, 3), (COMPLETIONS, 1)):
        for _ in range(times):
            r = client.post(path, json=body_for(path, server.model, kvgate_test_frob={"a": [1]}, seed=1))
            assert r.status_code == 200, r.text
    after = scrape(server)
    assert moved(before, after, "unknown_request_fields_total", field="kvgate_test_frob", endpoint=CHAT) == 3
    assert moved(before, after, "unknown_request_fields_total", field="kvgate_test_frob", endpoint=COMPLETIONS) == 1
    assert metric(after, "unknown_request_fields_total", field="seed") == 0  # known fields are not counted
    lines = _logged(server, "'kvgate_test_frob'", 2)
    time.sleep(0.2)  # a third line, were there one, would be in by now
    lines = _logged(server, "'kvgate_test_frob'", 3, timeout=0)
    assert len(lines) == 2, lines
    assert all("WARNING" in line for line in lines), lines
    assert sum(CHAT in line for line in lines) == 1 and sum(COMPLETIONS in line for line in lines) == 1, lines


def test_refused_body_counts_nothing(client, server):
    """A body refused for another reason is not read for unknown fields."""
    before = scrape(server)
    r = client.post(CHAT, json=body_for(CHAT, server.model, kvgate_test_refused=1, n=0))
    assert r.status_code == 400
    assert moved(before, scrape(server), "unknown_request_fields_total", field="kvgate_test_refused") == 0


def _tracker():
    registry = CollectorRegistry()
    counter = Counter("t:unknown", "t", ["field", "endpoint"], registry=registry)
    return UnknownFields(counter), lambda **labels: registry.get_sample_value("t:unknown_total", labels) or 0


@pytest.mark.parametrize("struct, body", [
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
    (CompletionRequest, {"model": "m", "prompt": "p", "max_tokens": 3, "echo": True}),
])
def test_known_fields_are_not_unknown(struct, body):
    tracker, value = _tracker()
    tracker.check(msgspec.json.encode(body), struct, "/x")
    tracker.check(msgspec.json.encode({**body, "messages": []}), struct, "/x")  # a nested key is not top-level
    assert value(field="messages", endpoint="/x") == (1 if struct is CompletionRequest else 0)
    assert value(field="model", endpoint="/x") == 0


def test_names_are_bounded(caplog):
    """Past MAX_NAMES series, or a name longer than MAX_NAME_CHARS, a name counts as OTHER: logged once."""
    tracker, value = _tracker()
    body = {"model": "m", "prompt": "p"}
    with caplog.at_level(logging.WARNING, logger="kvgate.gateway"):
        tracker.check(msgspec.json.encode({**body, "x" * (MAX_NAME_CHARS + 1): 1}), CompletionRequest, "/c")
        for i in range(MAX_NAMES + 5):
            tracker.check(msgspec.json.encode({**body, f"f{i}": 1}), CompletionRequest, "/c")
    assert value(field=OTHER, endpoint="/c") == 1 + 6  # the long name, then the names past the bound
    assert value(field="f0", endpoint="/c") == 1 and value(field=f"f{MAX_NAMES - 2}", endpoint="/c") == 1
    assert value(field=f"f{MAX_NAMES - 1}", endpoint="/c") == 0
    assert len(caplog.records) == MAX_NAMES and all(r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("name", ["a\rb", "line\u2028break", "nul\x00", "caf\u00e9"])
def test_names_outside_printable_ascii_count_as_other(name):
    """A label value with a line break or a NUL would break /metrics readers: such a name counts as OTHER."""
    tracker, value = _tracker()
    tracker.check(msgspec.json.encode({"model": "m", "prompt": "p", name: 1}), CompletionRequest, "/c")
    assert value(field=OTHER, endpoint="/c") == 1
    assert value(field=name, endpoint="/c") == 0
