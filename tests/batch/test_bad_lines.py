"""A file with bad lines: each gets an error line with the status and message the gateway gives for it, the run
goes on to the end, the summary goes to stderr, and the exit status is 1 (0 when every line succeeded)."""

from __future__ import annotations

import pytest

from tests.batch.helpers import (
    COMPLETIONS,
    LONG_PROMPT,
    MAX_LEN,
    chat,
    completion,
    error_of,
    ok_body,
    read_jsonl,
    request,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("deadline", "in_process_core")

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]  # not a schema


def test_bad_lines_become_error_lines_and_the_run_goes_on(tmp_path, batch_cli):
    rows = ["this is not JSON",  # first: the format is still detected from the lines that parse
            "[1, 2, 3]",
            completion("ok-1", max_tokens=2),
            request("url", "/v1/embeddings", {"input": "x"}),
            request("method", COMPLETIONS, {"prompt": "x"}, method="GET"),
            completion("stream", stream=True),
            completion("context", prompt=LONG_PROMPT),
            chat("chat-context", content=LONG_PROMPT),
            completion("max-tokens", max_tokens=10 * MAX_LEN),
            completion("param", temperature=-1),
            completion("type", max_tokens="three"),
            chat("tools", tools=TOOLS),
            {"custom_id": "no-body", "method": "POST", "url": COMPLETIONS},
            {"method": "POST", "url": COMPLETIONS, "body": {"prompt": "x"}},
            chat("ok-2", max_tokens=2)]
    out = tmp_path / "out.jsonl"
    result = batch_cli(write_jsonl(tmp_path / "in.jsonl", rows), "-o", out, "--temperature", "0")
    assert result.exit_code == 1, result.output
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == [
        "line-0", "line-1", "ok-1", "url", "method", "stream", "context", "chat-context", "max-tokens", "param",
        "type", "tools", "no-body", "line-13", "ok-2"]
    got = dict(zip([line["custom_id"] for line in lines], lines))
    assert ok_body(got["ok-1"])["object"] == "text_completion" and ok_body(got["ok-2"])["object"] == "chat.completion"

    assert error_of(got["line-0"], 400)["code"] == "invalid_json" and got["line-0"]["error"]["code"] == "invalid_json"
    assert "line 1 is not valid JSON" in got["line-0"]["error"]["message"]
    assert "not a JSON object" in error_of(got["line-1"], 400)["message"]
    error = error_of(got["url"], 404)
    assert error["param"] == "url" and error["message"].startswith("POST /v1/embeddings does not exist")
    error = error_of(got["method"], 405)
    assert error["param"] == "method" and error["message"] == f"GET is not allowed on {COMPLETIONS}."
    error = error_of(got["stream"], 400)
    assert error["param"] == "stream" and "stream" in error["message"]
    for custom_id, param in (("context", "prompt"), ("chat-context", "messages"), ("max-tokens", "max_tokens")):
        error = error_of(got[custom_id], 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == param, error
        assert f"maximum context length is {MAX_LEN} tokens" in error["message"]
        assert got[custom_id]["error"]["code"] == "context_length_exceeded"
    assert error_of(got["param"], 400)["param"] == "temperature"
    error = error_of(got["type"], 400)
    assert error["param"] == "max_tokens" and error["message"].startswith("Invalid request body")
    assert error_of(got["tools"], 400)["param"] == "tools"
    assert error_of(got["no-body"], 400)["param"] == "body"
    assert error_of(got["line-13"], 400)["param"] == "custom_id"
    for line in lines:
        if line["error"] is not None:
            assert line["error"]["code"] == (line["response"]["body"]["error"]["code"] or "invalid_request_error")

    assert "15 lines" in result.stderr and "13 failed" in result.stderr


def test_every_line_good_exits_0(tmp_path, batch_cli):
    out = tmp_path / "out.jsonl"
    rows = [completion("a", max_tokens=1), chat("b", max_tokens=1), "", "   "]  # blank lines are not lines
    result = batch_cli(write_jsonl(tmp_path / "in.jsonl", rows), "-o", out)
    assert result.exit_code == 0, result.output
    assert [line["custom_id"] for line in read_jsonl(out)] == ["a", "b"]
    assert "2 lines (2 done, 0 failed)" in result.stderr


def test_empty_input_writes_an_empty_output(tmp_path, batch_cli):
    out = tmp_path / "out.jsonl"
    result = batch_cli(write_jsonl(tmp_path / "in.jsonl", []), "-o", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == b"" and "0 lines" in result.stderr


def test_unknown_fields_are_ignored_logged_once_and_counted_in_the_summary(tmp_path, batch_cli, caplog):
    rows = [completion("a", max_tokens=2, made_up=1), completion("b", max_tokens=2, made_up=2, other="x"),
            chat("c", max_tokens=2, made_up=True), completion("d", max_tokens=2)]
    out = tmp_path / "out.jsonl"
    with caplog.at_level("WARNING", logger="kvgate.gateway"):
        result = batch_cli(write_jsonl(tmp_path / "in.jsonl", rows), "-o", out, "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert all("response" in line and line["error"] is None for line in read_jsonl(out))
    assert "ignored unknown field 'made_up' in 3 line(s)" in result.output
    assert "ignored unknown field 'other' in 1 line(s)" in result.output
    warned = [r.getMessage() for r in caplog.records if "unknown request field" in r.getMessage()]
    assert sorted(warned) == sorted([  # once per field and endpoint, however many lines have it
        "unknown request field 'made_up' on /v1/completions: ignored",
        "unknown request field 'other' on /v1/completions: ignored",
        "unknown request field 'made_up' on /v1/chat/completions: ignored"])
