"""`kvgate batch run` options: input order kept whatever order lines finish in, sampling defaults that a line's
own fields override, model names (any name runs; --strict-model refuses others), --output-format simple, and
duplicate custom_ids refused before any work."""

from __future__ import annotations

import pytest

from tests.batch.helpers import (
    by_id,
    chat,
    completion,
    error_of,
    ok_body,
    read_jsonl,
    stable,
    text_of,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("deadline", "in_process_core")


def test_output_keeps_input_order_when_lines_finish_out_of_order(tmp_path, batch_cli):
    # long lines first: with 8 in flight, the short ones after them finish long before
    max_tokens = [40, 1, 30, 2, 20, 1, 3, 12, 1, 25, 5, 1, 8, 2, 16, 1]
    rows = [completion(f"r{i}", prompt=f"line {i}", max_tokens=m) if i % 2 else
            chat(f"r{i}", content=f"line {i}", max_tokens=m) for i, m in enumerate(max_tokens)]
    out = tmp_path / "out.jsonl"
    result = batch_cli(write_jsonl(tmp_path / "in.jsonl", rows), "-o", out, "--max-in-flight", "8",
                       "--ignore-eos", "--temperature", "0")
    assert result.exit_code == 0, result.output
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == [f"r{i}" for i in range(len(max_tokens))]
    assert [ok_body(line)["usage"]["completion_tokens"] for line in lines] == max_tokens


def test_cli_defaults_apply_and_a_line_overrides_them(tmp_path, batch_cli):
    greedy = tmp_path / "greedy.jsonl"
    result = batch_cli(write_jsonl(tmp_path / "probe.jsonl", [{"id": "p", "prompt": "the cat"}]), "-o", greedy,
                       "--temperature", "0", "--max-tokens", "12", "--ignore-eos")
    assert result.exit_code == 0, result.output
    full = text_of(read_jsonl(greedy)[0])
    stop = next(c for c in full[1:] if c.isalnum())  # a character the greedy answer contains

    same = {"max_tokens": 3, "temperature": 0, "stop": [stop, "\u2603also-never"], "ignore_eos": True}
    rows = [{"id": "defaults", "prompt": "the cat"},
            {"id": "explicit", "prompt": "the cat", **same},  # the defaults, stated by the line itself
            {"id": "default-stop", "prompt": "the cat", "max_tokens": 12},
            {"id": "chat-defaults", "messages": [{"role": "user", "content": "hi"}], "stop": None},
            {"id": "own-max-tokens", "prompt": "the cat", "max_tokens": 5, "stop": ["\u2603never"]},
            {"id": "own-stop", "prompt": "the cat", "stop": None, "max_tokens": 12},
            {"id": "own-temperature", "prompt": "the cat", "temperature": 1.5, "seed": 3, "max_tokens": 12,
             "stop": None},
            {"id": "own-ignore-eos", "prompt": "the cat", "ignore_eos": False, "stop": None, "max_tokens": 12}]
    out = tmp_path / "out.jsonl"
    result = batch_cli(write_jsonl(tmp_path / "in.jsonl", rows), "-o", out, "--max-tokens", "3",
                       "--temperature", "0", "--stop", stop, "--stop", "\u2603also-never", "--ignore-eos")
    assert result.exit_code == 0, result.output
    got = by_id(read_jsonl(out))
    defaults = ok_body(got["defaults"])
    assert stable(defaults) == stable(ok_body(got["explicit"]))
    assert defaults["usage"]["completion_tokens"] <= 3 and full.startswith(text_of(got["defaults"]))
    cut = ok_body(got["default-stop"])  # greedy, cut by the default stop string
    assert text_of(got["default-stop"]) == full[:full.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    assert ok_body(got["chat-defaults"])["usage"]["completion_tokens"] == 3
    own = ok_body(got["own-max-tokens"])  # its own stop list replaces the default one
    assert own["usage"]["completion_tokens"] == 5 and own["choices"][0]["finish_reason"] == "length"
    assert text_of(got["own-stop"]) == full  # stop: null: no stop string
    assert text_of(got["own-temperature"]) != full  # sampled, not greedy
    assert ok_body(got["own-temperature"])["usage"]["completion_tokens"] == 12
    assert full.startswith(text_of(got["own-ignore-eos"]))  # greedy still; it may end at an end of sequence


def test_model_names_any_name_runs_unless_strict(tmp_path, batch_cli, tiny_llama_dir):
    served = tiny_llama_dir.name
    rows = [chat("gpt", max_tokens=2), completion("served", model=served, max_tokens=2),
            completion("unnamed", max_tokens=2)]
    del rows[2]["body"]["model"]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "loose.jsonl"
    result = batch_cli(path, "-o", out, "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert [ok_body(line)["model"] for line in read_jsonl(out)] == [served] * 3

    out = tmp_path / "strict.jsonl"
    result = batch_cli(path, "-o", out, "--temperature", "0", "--strict-model")
    assert result.exit_code == 1
    gpt, named, unnamed = read_jsonl(out)
    error = error_of(gpt, 404)
    assert error["code"] == "model_not_found" and error["param"] == "model" and "gpt-4o" in error["message"]
    assert gpt["error"]["code"] == "model_not_found"
    assert ok_body(named)["model"] == served and ok_body(unnamed)["model"] == served
    assert "1 failed" in result.stderr


def test_simple_output_format(tmp_path, batch_cli):
    rows = [chat("c", max_tokens=3), completion("k", max_tokens=2), "{broken", completion("bad", temperature=-1)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    args = ("--temperature", "0", "--ignore-eos")
    assert batch_cli(path, "-o", tmp_path / "openai.jsonl", *args).exit_code == 1
    reference = read_jsonl(tmp_path / "openai.jsonl")
    out = tmp_path / "simple.jsonl"
    result = batch_cli(path, "-o", out, "--output-format", "simple", *args)
    assert result.exit_code == 1
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == ["c", "k", "line-2", "bad"]
    for line, full in zip(lines[:2], reference[:2]):
        assert set(line) == {"custom_id", "text", "finish_reason", "usage"}
        body = ok_body(full)
        assert line["text"] == text_of(full) and line["usage"] == body["usage"]
        assert line["finish_reason"] == body["choices"][0]["finish_reason"] == "length"
    for line, full in zip(lines[2:], reference[2:]):
        assert set(line) == {"custom_id", "error"}
        assert line["error"] == full["response"]["body"]["error"]
    assert lines[2]["error"]["code"] == "invalid_json" and lines[3]["error"]["param"] == "temperature"


@pytest.mark.parametrize("fmt", ["openai", "plain"])
def test_duplicate_custom_ids_fail_before_any_work(tmp_path, batch_cli, fmt):
    if fmt == "openai":
        rows = [completion("a"), completion("dup-id"), chat("b"), chat("dup-id")]
    else:
        rows = [{"id": "a", "prompt": "x"}, {"id": "dup-id", "prompt": "y"}, {"prompt": "z"},
                {"custom_id": "dup-id", "messages": [{"role": "user", "content": "w"}]}]
    out = tmp_path / "out.jsonl"
    result = batch_cli(write_jsonl(tmp_path / "in.jsonl", rows), "-o", out)
    assert result.exit_code == 1
    assert "'dup-id'" in result.output and "lines 2 and 4" in result.output
    assert not out.exists()
    out.write_text("")  # an existing output is not touched either
    assert batch_cli(tmp_path / "in.jsonl", "-o", out, "--resume").exit_code == 1
    assert out.read_text() == ""


def test_bad_shard_resume_to_stdout_and_max_in_flight_are_refused(tmp_path, batch_cli):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    for shard in ("0/3", "4/3", "1-3", "a/b"):
        result = batch_cli(path, "-o", tmp_path / "out.jsonl", "--shard", shard)
        assert result.exit_code == 1 and "--shard" in result.output, shard
    result = batch_cli(path, "-o", "-", "--resume")
    assert result.exit_code == 1 and "--resume" in result.output
    for count in ("0", "-1"):
        result = batch_cli(path, "-o", tmp_path / "out.jsonl", "--max-in-flight", count)
        assert result.exit_code == 2 and "--max-in-flight" in result.output, result.output
    assert not (tmp_path / "out.jsonl").exists()
