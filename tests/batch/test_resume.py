"""--resume: a run killed mid-way (SIGKILL: nothing to clean up) is finished by a second run that does only the
lines not yet answered; the output then holds every line once, in input order, as an uninterrupted run would
have written them. A last line cut short by the kill is dropped and redone."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.batch.helpers import MAX_LEN, in_process_engine, read_jsonl, stable_line, write_jsonl

pytestmark = pytest.mark.usefixtures("deadline")

LINES = 60
# 200 tokens for each of 60 lines, 4 at a time: several seconds of work for the tiny model on a small CPU
GREEDY = ("--max-tokens", "200", "--ignore-eos", "--temperature", "0", "--max-in-flight", "4")


def _rows():
    # prompts shorter than a KV block and different from their first token: no prefix-cache hits, so that
    # cached_tokens is 0 in every run whatever ran before
    return [{"custom_id": f"r{i:02d}", "prompt": f"{i} the cat"} if i % 3 else
            {"custom_id": f"r{i:02d}", "messages": [{"role": "user", "content": f"{i} hi"}]} for i in range(LINES)]


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "kvgate", "batch", "run", *map(str, args)]


def _count_lines(path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory, batch_cli):
    """The input, the output of an uninterrupted run of it, and that output's stable lines."""
    root = tmp_path_factory.mktemp("resume")
    path = write_jsonl(root / "in.jsonl", _rows())
    out = root / "reference.jsonl"
    with pytest.MonkeyPatch.context() as monkeypatch:
        in_process_engine(monkeypatch)
        result = batch_cli(path, "-o", out, *GREEDY)
    assert result.exit_code == 0, result.output
    return path, out, [stable_line(line) for line in read_jsonl(out)]


def test_resume_after_sigkill_finishes_the_run(tmp_path, tiny_llama_dir, reference):
    path, _, expected = reference
    out = tmp_path / "out.jsonl"
    model = ("--model", tiny_llama_dir, "--max-model-len", MAX_LEN)
    proc = subprocess.Popen(_cli(path, "-o", out, *model, *GREEDY), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while _count_lines(out) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no output lines in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # the engine core process sees its pipe close and exits with it: nothing is left running
        assert _gone(proc.pid, 15), "the engine core outlived the killed batch run"
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.stderr.close()
    written = _count_lines(out)
    assert 3 <= written < LINES, f"the kill came too late: {written} lines were written already"

    resumed = subprocess.run(_cli(path, "-o", out, *model, *GREEDY, "--resume"), capture_output=True, timeout=100)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert f"{LINES - written} lines" in resumed.stderr.decode()  # only the lines not yet answered
    lines = read_jsonl(out)
    ids = [line["custom_id"] for line in lines]
    assert len(set(ids)) == len(ids) == LINES  # each line once
    assert ids == [f"r{i:02d}" for i in range(LINES)]  # in input order
    # The lines answered before the kill are kept as they were. The rest ran in other batches than in the
    # uninterrupted run, and over 200 greedy tokens of a random model a float rounding may flip an argmax, so
    # they are compared whole but for their text.
    assert [stable_line(line) for line in lines[:written]] == expected[:written]
    assert [_without_text(stable_line(line)) for line in lines] == [_without_text(e) for e in expected]


def _without_text(line: dict) -> dict:
    line = copy.deepcopy(line)
    for choice in line["body"].get("choices", []):
        if "message" in choice:
            choice["message"]["content"] = None
        else:
            choice["text"] = None
    return line


@pytest.mark.usefixtures("in_process_core")
def test_a_cut_last_line_is_dropped_and_redone(tmp_path, batch_cli, reference):
    path, uninterrupted, expected = reference
    out = tmp_path / "out.jsonl"
    full = uninterrupted.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(full[:7]) + full[7][: len(full[7]) // 2])  # killed while writing line 8
    result = batch_cli(path, "-o", out, *GREEDY, "--resume")
    assert result.exit_code == 0, result.output
    assert f"{LINES - 7} lines" in result.stderr
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == [f"r{i:02d}" for i in range(LINES)]
    assert [stable_line(line) for line in lines] == expected
    # done already: a second resume does nothing and changes nothing
    before = out.read_bytes()
    result = batch_cli(path, "-o", out, *GREEDY, "--resume")
    assert result.exit_code == 0, result.output
    assert "0 lines" in result.stderr and out.read_bytes() == before


@pytest.mark.usefixtures("in_process_core")
def test_resume_without_an_output_runs_everything(tmp_path, batch_cli):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    out = tmp_path / "out.jsonl"
    result = batch_cli(path, "-o", out, "--max-tokens", "1", "--resume")
    assert result.exit_code == 0, result.output
    assert [line["custom_id"] for line in read_jsonl(out)] == ["line-0", "line-1"]
