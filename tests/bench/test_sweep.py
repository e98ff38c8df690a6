"""`kvgate bench sweep` and `kvgate bench load` end to end against the fake OpenAI server on 127.0.0.1: every
field of every level, the output files (JSON, CSV, charts, HTML in Chromium), errors by kind, the early stop,
datasets, local token counting, Ctrl-C, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import charts
from bench.fake_openai import FakeOpenAI
from bench.sweep_command import load, sweep
from tests.bench.interrupt import interrupt_second_level
from tests.browser import Browser

ROOT = Path(__file__).resolve().parents[2]
LEVEL_FIELDS = {"mode", "concurrency", "rate", "burstiness", "requests", "completed", "failed", "errors",
                "duration_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s",
                "goodput_requests_per_s", "mean_prompt_tokens", "mean_output_tokens", "mean_concurrency",
                "ttft_s", "itl_s", "tpot_s", "e2e_s"}
SUMMARY = {"n", "mean", "std", "min", "p50", "p90", "p99", "max"}
LOAD_KEYS = {"url", "endpoint", "model", "concurrency", "num_requests", "completed", "failed", "errors",
             "duration_s", "output_tokens", "content_chunks", "output_tokens_per_s", "requests_per_s", "ttft_s",
             "tpot_s", "itl_s", "e2e_s"}


@pytest.fixture
def fake():
    server = FakeOpenAI(delay_s=0.001).start_thread()
    yield server
    server.stop()


def _sweep(fake, *args, model="fake"):
    result = CliRunner().invoke(sweep, ["--url", fake.url, "--model", model, "--prompt-tokens", "6",
                                        "--max-tokens", "12", "--timeout", "10", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_every_field_of_every_level_and_the_files(fake, tmp_path):
    out = tmp_path / "out"
    result = _sweep(fake, "--concurrency", "4,1,2", "--requests", "8", "--warmup", "2", "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["kind"] == "sweep" and doc["stopped_early"] is None
    assert set(doc) == {"kind", "header", "settings", "levels", "notes"} | {"stopped_early"}
    head = doc["header"]
    assert head["url"] == fake.url and head["model"] == "fake"
    assert head["server_info"] == {"model_id": "fake", "max_batch_total_tokens": 4096, "max_num_seqs": 8}
    assert {"device", "platform", "versions", "command", "started"} <= set(head)
    assert doc["settings"]["concurrency"] == [4, 1, 2] and doc["settings"]["prompt_tokens"] == "6"
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 2, 4]  # ascending
    assert fake.requests == 3 * (8 + 2)  # warm-up requests are sent, then left out
    for lv in doc["levels"]:
        assert set(lv) == LEVEL_FIELDS
        assert lv["mode"] == "concurrency" and lv["rate"] is None and lv["burstiness"] is None
        assert lv["requests"] == lv["completed"] == 8 and lv["failed"] == 0 and lv["errors"] == {}
        assert lv["mean_output_tokens"] == 12 and lv["mean_prompt_tokens"] == 6  # the fake's usage
        assert lv["duration_s"] > 0
        assert lv["requests_per_s"] == pytest.approx(8 / lv["duration_s"])
        assert lv["output_tokens_per_s"] == pytest.approx(96 / lv["duration_s"])
        assert lv["total_tokens_per_s"] == pytest.approx(144 / lv["duration_s"])
        assert lv["goodput_requests_per_s"] == pytest.approx(lv["requests_per_s"])  # all within 2 s / 50 ms
        assert 0.5 < lv["mean_concurrency"] <= lv["concurrency"] + 1e-9
        for metric in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
            assert set(lv[metric]) == SUMMARY and all(v is not None and v >= 0 for v in lv[metric].values())
        assert lv["ttft_s"]["n"] == lv["tpot_s"]["n"] == lv["e2e_s"]["n"] == 8 and lv["itl_s"]["n"] == 8 * 11
        assert lv["ttft_s"]["max"] < lv["e2e_s"]["min"] + 1e-9 or lv["ttft_s"]["p50"] < lv["e2e_s"]["p50"]
    assert any(n.startswith("token counts: the server's usage") for n in doc["notes"])
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 3 and [r["concurrency"] for r in rows] == ["1", "2", "4"]
    assert {"ttft_s_p50", "tpot_s_p90", "goodput_requests_per_s", "errors"} <= set(rows[0])
    assert float(rows[2]["ttft_s_p90"]) == pytest.approx(doc["levels"][2]["ttft_s"]["p90"])
    expected = {"ttft.png": 6, "tpot.png": 6, "throughput_latency.png": 3, "goodput.png": 6,
                "level0_ttft.png": 8, "level2_ttft.png": 8}
    for name, points in expected.items():
        assert charts.points_of(out / name) == points, name
    page = (out / "sweep.html").read_text()
    assert page.count('<section class="view"') == 3 and "1 users" in page
    assert "kvgate bench sweep" in result.output  # the table at the end


def test_rate_levels(fake, tmp_path):
    result = _sweep(fake, "--rate", "40,80", "--burstiness", "0.5", "--requests", "12", "--seed", "3",
                    "--output-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    levels = json.loads((tmp_path / "sweep.json").read_text())["levels"]
    assert [(lv["mode"], lv["rate"], lv["burstiness"], lv["concurrency"]) for lv in levels] == [
        ("rate", 40.0, 0.5, None), ("rate", 80.0, 0.5, None)]
    assert all(set(lv) == LEVEL_FIELDS and lv["completed"] == 12 for lv in levels)
    assert charts.points_of(tmp_path / "ttft.png") == 4


@pytest.mark.parametrize("model, args, kind", [
    ("fail500", [], "http_500"),
    ("cut", [], "stream_cut_short"),
    ("slow", ["--timeout", "0.5"], "timeout"),
])
def test_failures_are_reported_by_kind(fake, tmp_path, model, args, kind):
    result = _sweep(fake, "--concurrency", "2", "--requests", "4", *args, "--output-dir", str(tmp_path), model=model)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "sweep.json").read_text())
    (level,) = doc["levels"]
    assert level["errors"] == {kind: 4} and level["failed"] == 4 and level["completed"] == 0
    assert level["ttft_s"]["n"] == 0 and level["ttft_s"]["p50"] is None and level["goodput_requests_per_s"] == 0
    assert any(note.startswith(f"2 users: 4 x {kind}, e.g.") for note in doc["notes"])
    assert doc["stopped_early"].startswith("saturated at 2 users: 4 of 4 requests failed")


def test_connection_refused_is_a_kind_too(tmp_path):
    fake = FakeOpenAI()  # never started: a port nothing listens on
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        fake.port = s.getsockname()[1]
    result = _sweep(fake, "--concurrency", "1", "--requests", "2", "--output-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "sweep.json").read_text())["levels"][0]["errors"] == {"connection_refused": 2}


def test_saturation_stops_the_sweep_early(tmp_path):
    fake = FakeOpenAI(delay_s=0.003, capacity=2).start_thread()  # HTTP 503 beyond 2 requests in flight
    try:
        result = _sweep(fake, "--concurrency", "1,2,4,8", "--requests", "12", "--output-dir", str(tmp_path),
                        model="busy")
    finally:
        fake.stop()
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 2, 4]
    assert doc["levels"][1]["failed"] == 0 and doc["levels"][2]["errors"]["http_503"] > 1
    assert doc["stopped_early"].startswith("saturated at 4 users:") and "1 higher level not run" in \
        doc["stopped_early"]
    assert "stopping the sweep" in result.stderr and "http_503" in (tmp_path / "sweep.csv").read_text()


def test_goodput_follows_the_service_levels(fake, tmp_path):
    fake.delay_s = 0.004  # TPOT about 4 ms
    args = ["--concurrency", "2", "--requests", "6", "--output-dir", str(tmp_path)]
    strict = _sweep(fake, *args, "--slo-tpot", "1")
    assert json.loads((tmp_path / "sweep.json").read_text())["levels"][0]["goodput_requests_per_s"] == 0, \
        strict.output
    _sweep(fake, *args, "--slo-tpot", "100")
    level = json.loads((tmp_path / "sweep.json").read_text())["levels"][0]
    assert level["goodput_requests_per_s"] == pytest.approx(level["requests_per_s"])


def test_dataset_chats_are_sent(fake, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"}],
                                          "max_tokens": 3 + i}) for i in range(3)))
    result = _sweep(fake, "--concurrency", "2", "--requests", "6", "--endpoint", "chat", "--dataset", str(data),
                    "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    sent = sorted((b["messages"][0]["content"], b["max_tokens"]) for b in fake.bodies)
    assert sent == sorted([(f"question {i}", 3 + i) for i in range(3)] * 2)
    level = json.loads((tmp_path / "out" / "sweep.json").read_text())["levels"][0]
    assert level["mean_output_tokens"] == pytest.approx(4)


def test_hf_dataset_is_sent(fake, tmp_path):
    import datasets

    convs = [[{"from": "human", "value": f"tell me {i}"}, {"from": "gpt", "value": "y" * 20}] for i in range(2)]
    datasets.Dataset.from_dict({"conversations": convs}).save_to_disk(str(tmp_path / "hf"))
    result = _sweep(fake, "--concurrency", "1", "--requests", "2", "--endpoint", "chat", "--dataset",
                    str(tmp_path / "hf"))
    assert result.exit_code == 0, result.output
    assert sorted(b["messages"][0]["content"] for b in fake.bodies) == ["tell me 0", "tell me 1"]
    assert {b["max_tokens"] for b in fake.bodies} == {5}  # 20 characters of reply / 4


def test_tokens_counted_locally_without_usage(fake, tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    args = ["--concurrency", "1", "--requests", "2", "--endpoint", "chat", "--output-dir", str(tmp_path)]
    _sweep(fake, *args, model="nousage")
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert doc["levels"][0]["mean_output_tokens"] == 12 and "content chunks counted" in doc["notes"][0]
    _sweep(fake, *args, "--tokenizer", str(tiny_tokenizer_dir), model="nousage")
    doc = json.loads((tmp_path / "sweep.json").read_text())
    words = fake.bodies[-1]["messages"][0]["content"]
    assert doc["levels"][0]["mean_output_tokens"] == len(tiny_tokenizer.encode(" tok" * 12, add_special_tokens=False))
    assert doc["levels"][0]["mean_prompt_tokens"] == pytest.approx(
        len(tiny_tokenizer.encode(words, add_special_tokens=False)), rel=0.5)
    assert "local tokenizer" in doc["notes"][0]


@pytest.mark.skipif(not Browser.available(), reason="Debian's chromium is not installed")
def test_the_html_report_switches_levels_in_chromium(fake, tmp_path):
    _sweep(fake, "--concurrency", "1,2", "--requests", "4", "--output-dir", str(tmp_path / "out"))
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(tmp_path / "out" / "sweep.html")
        hidden = "[...document.querySelectorAll('section.view')].map(s => s.hidden)"
        assert browser.evaluate(hidden) == [False, True]
        browser.evaluate("document.querySelector('#selector').scrollIntoView()")  # below the charts
        browser.click('#selector button[data-view="1"]')
        assert browser.evaluate(hidden) == [True, False]
        assert browser.evaluate("document.querySelector('#selector [aria-selected=true]').textContent") == "2 users"
        assert browser.evaluate("document.querySelectorAll('img').length") == 4 + 2
        assert browser.errors() == []
    finally:
        browser.close()


def test_ctrl_c_keeps_the_finished_levels(tmp_path):
    out = tmp_path / "out"
    returncode, stderr = interrupt_second_level("from bench.sweep_command import sweep; sweep()", out)
    assert returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted: 1 finished level(s) kept" in stderr
    doc = json.loads((out / "sweep.json").read_text())
    assert [lv["concurrency"] for lv in doc["levels"]] == [1] and doc["levels"][0]["completed"] == 3
    assert doc["stopped_early"].startswith("interrupted")
    assert (out / "sweep.html").exists() and len(list(csv.DictReader((out / "sweep.csv").open()))) == 1


def test_load_prints_the_old_json_line(fake, tmp_path):
    result = CliRunner().invoke(load, ["--url", fake.url + "/v1", "--concurrency", "3", "--requests", "7",
                                       "--max-tokens", "5", "--prompt-tokens", "4", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert LOAD_KEYS <= set(line)
    assert line["url"] == fake.url and line["model"] == "fake" and line["concurrency"] == 3
    assert line["completed"] == 7 and line["output_tokens"] == 35 and line["errors"] == []
    assert fake.max_in_flight <= 3 and fake.requests == 7
    assert json.loads((tmp_path / "sweep.json").read_text())["levels"][0]["requests"] == 7


@pytest.mark.parametrize("args, message", [
    (["--concurrency", "2", "--rate", "1"], "not both"),
    (["--concurrency", "0"], "positive integers"),
    (["--rate", "x"], "comma-separated numbers"),
    (["--prompt-tokens", "uniform:9:3"], "not a length"),
    (["--duration", "5", "--requests", "3"], "not both"),
    (["--burstiness", "0", "--rate", "2"], "must be positive"),
])
def test_bad_options_are_usage_errors(args, message):
    result = CliRunner().invoke(sweep, args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_an_unreachable_server_is_a_clear_error():
    result = CliRunner().invoke(sweep, ["--url", "http://127.0.0.1:9", "--concurrency", "1", "--requests", "1"])
    assert result.exit_code == 1 and "cannot reach http://127.0.0.1:9" in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
