"""`kvgate capacity` as a command: the simulation checked through it, each bad input's message and exit code,
the printed reasoning, the outputs (JSON fields, the charts' points, the HTML page in chromium), --url and
Ctrl-C."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from bench import charts
from tests.bench.capacity_cases import SWEEP, run, write
from tests.bench.interrupt import interrupt_second_level
from tests.browser import Browser


def flat_sweep(tmp_path) -> Path:
    doc = json.loads(SWEEP.read_text())
    for level in doc["levels"]:
        level["e2e_s"]["mean"] = 12.0
    return write(tmp_path, doc)


def test_the_command_simulates_and_agrees_within_5_percent_on_a_flat_curve(tmp_path):
    out = tmp_path / "out"
    result = run("--from", flat_sweep(tmp_path), "--org-users", 5000, "--simulate", "--output-dir", out)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "capacity.json").read_text())
    assert doc["organisation"]["peak"] == 47  # W = 12 s at every load
    assert abs(doc["simulation"]["agreement"]) <= 0.05
    assert doc["simulation"]["replicas"] == doc["organisation"]["serving_replicas"]


def test_the_command_simulates_and_agrees_within_5_percent_on_the_rising_curve(tmp_path):
    out = tmp_path / "out"
    result = run("--from", SWEEP, "--org-users", 5000, "--simulate", "--output-dir", out)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "capacity.json").read_text())
    org, sim = doc["organisation"], doc["simulation"]
    assert (org["peak"], org["at_operating_point"]["peak"], sim["peak"]) == (29, 48, 30)
    assert abs(sim["agreement"]) <= 0.05 and sim["replicas"] == org["serving_replicas"] == 2
    assert "differs from the closed form's by more than 5%" not in " ".join(result.output.split())
    # --gpus alone simulates the reverse's organisation on its serving replicas
    result = run("--from", SWEEP, "--gpus", 3, "--simulate", "--output-dir", tmp_path / "rev")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "rev" / "capacity.json").read_text())
    assert doc["simulation"]["replicas"] == doc["reverse"]["serving_replicas"] == 2


# ---- the command: bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("args, code, message", [
    (["--active-share", "1.5"], 2, "--active-share is a share in [0, 1]"),
    (["--active-share", "-0.1"], 2, "--active-share is a share in [0, 1]"),
    (["--org-users", "0"], 2, "at least one person"),
    (["--org-users", "-5"], 2, "at least one person"),
    (["--goodput", "1.2"], 2, "--goodput is a share in (0, 1]"),
    (["--peak-quantile", "1"], 2, "--peak-quantile is a share in (0, 1)"),
    (["--tpot-p90", "0"], 2, "--tpot-p90 must be positive"),
    (["--tpot-p90", "10"], 1, "even the lightest measured level"),
    (["--gpus", "1"], 1, "none is left to serve"),
    (["--simulate"], 1, "--simulate needs arrivals"),
    (["--request-log", "missing.jsonl"], 2, "does not exist"),
])
def test_bad_options_say_what_is_wrong(args, code, message):
    result = run("--from", SWEEP, *args)
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split())


@pytest.mark.parametrize("content, message", [
    ("", "not JSON"),
    ("{\"kind\": \"sweep\", \"levels\": [", "not JSON"),
    ("[1, 2]", "expected a `kvgate bench sweep` result"),
    ("{\"kind\": \"engine\", \"levels\": []}", "not a sweep"),
    ("{\"kind\": \"sweep\", \"levels\": []}", "no measured levels"),
    ("{\"kind\": \"sweep\"}", "no measured levels"),
    ("{\"kind\": \"sweep\", \"levels\": [{\"mode\": \"concurrency\"}]}", "level 0 lacks"),
])
def test_bad_result_files_say_what_is_wrong(tmp_path, content, message):
    result = run("--from", write(tmp_path, content))
    assert result.exit_code == 1, result.output
    assert message in result.output


def test_a_missing_file_and_a_bad_request_log(tmp_path):
    result = run("--from", tmp_path / "nowhere.json")
    assert result.exit_code == 2 and "does not exist" in result.output
    log = write(tmp_path, "1700000000\nnot json\n", "log.jsonl")
    result = run("--from", SWEEP, "--request-log", log)
    assert result.exit_code == 1 and "log.jsonl:2: not JSON" in result.output
    log = write(tmp_path, "{\"user\": 3}\n", "log.jsonl")
    assert "log.jsonl:1: no timestamp" in run("--from", SWEEP, "--request-log", log).output
    log = write(tmp_path, "1700000000\n1700000100\n", "log.jsonl")
    result = run("--from", SWEEP, "--request-log", log, "--gpus", 4)
    assert result.exit_code == 1 and "needs --org-users" in result.output


# ---- the command: what it tells and writes -----------------------------------------------------------------


def test_the_printed_reasoning_names_the_levels_and_the_numbers():
    result = run("--from", SWEEP, "--org-users", 5000, "--gpus", 8)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for expected in ("concurrency 32 is within (TPOT p90 45.0 ms", "concurrency 64 is beyond (TPOT p90 75.0 ms",
                     "16.7% of the way from 32 to 64", "36.0 concurrent requests", "W = 12.04 s",
                     "5,000 people × 10% active × 20 requests an hour = 10,000 requests an hour: λ = 2.78",
                     "With 2 serving replica(s) (the 1 in reserve is the one down", "m = 9.1, W = 6.55 s",
                     "L = λ·W = 2.78 × 6.55 s = 18.2", "its 99% quantile is 29",
                     "ceil(29 / 36.0) = 1 would do at this W, but on 1 each would carry m = 29.1",
                     "the peak 42 > 1 × 36.0; so 2 serving, the fewest whose own peak fits",
                     "+ 1 in reserve = 3 replicas × tensor-parallel 1 = 3 GPUs",
                     "At the operating point (every replica at C) W would be 12.04 s, L 33.5, peak 48",
                     "7 serve up to 252 requests in flight", "is 36,172 people", "W = 10.82 s",
                     "it would be 32,501", "32,768 tokens", "51.2 requests fit before preemption"):
        assert expected in text, expected


def test_the_json_result_and_the_charts(tmp_path):
    out = tmp_path / "out"
    result = run("--from", SWEEP, "--org-users", 5000, "--gpus", 8, "--tensor-parallel-size", 2,
                 "--output-dir", out)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "capacity.json").read_text())
    assert {"kind", "header", "settings", "levels", "stopped_early", "notes"} <= set(doc)
    assert doc["kind"] == "capacity" and doc["stopped_early"] is None and len(doc["levels"]) == 7
    assert doc["header"]["source"] == str(SWEEP) and doc["header"]["device"].startswith("NVIDIA H200")
    assert doc["settings"]["org_users"] == 5000 and doc["settings"]["tpot_p90_ms"] == 50.0
    assert doc["replica"]["capacity"] == pytest.approx(36.0) and doc["replica"]["within_load"] == 32
    org = doc["organisation"]
    assert org["rate"] == pytest.approx(2.7778, abs=1e-4) and org["peak"] == 29
    assert org["duration_s"] == pytest.approx(6.55, abs=0.005) and org["mean_concurrency"] == pytest.approx(18.195,
                                                                                                          abs=1e-3)
    assert org["per_replica_concurrency"] == pytest.approx(9.10, abs=0.005) and org["converged"]
    assert org["at_operating_point"] == {"duration_s": pytest.approx(12.044, abs=1e-3),
                                         "mean_concurrency": pytest.approx(33.456, abs=1e-3), "peak": 48,
                                         "serving_replicas": 2}
    assert (org["serving_replicas"], org["replicas"], org["gpus"]) == (2, 3, 6)
    assert doc["reverse"]["serving_replicas"] == 3  # 8 GPUs / tp 2 = 4 replicas, 1 in reserve
    assert doc["reverse"]["people"] > doc["reverse"]["at_operating_point"]["people"]
    assert doc["tokens"]["concurrency_bound"] == pytest.approx(51.2)
    assert doc["simulation"] is None and len(doc["reasoning"]) >= 8
    assert not list(out.glob("*.tmp"))
    assert charts.points_of(out / "capacity-tpot.png") == 7 and charts.points_of(out / "capacity-ttft.png") == 7
    assert (out / "capacity.html").exists()
    result = run("--from", SWEEP, "--goodput", 0.95, "--kv-tokens", 1000, "--output-dir", tmp_path / "g")
    assert result.exit_code == 0, result.output
    assert charts.points_of(tmp_path / "g" / "capacity-goodput.png") == 7
    doc = json.loads((tmp_path / "g" / "capacity.json").read_text())
    assert doc["organisation"] is None and doc["tokens"]["kv_tokens"] == 1000
    assert "scheduler preempts" in " ".join(result.output.split())  # 1,000 tokens hold 1.6 requests, not 26.9


def test_a_sweep_without_server_info_leaves_the_token_view_out(tmp_path):
    doc = json.loads(SWEEP.read_text())
    doc["header"] = {}
    result = run("--from", write(tmp_path, copy.deepcopy(doc)), "--output-dir", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "capacity.json").read_text())["tokens"] is None
    assert "No KV capacity known" in " ".join(result.output.split())


@pytest.mark.skipif(not Browser.available(), reason="Debian's chromium is not installed")
def test_the_html_report_opens_in_chromium(tmp_path):
    out = tmp_path / "out"
    assert run("--from", SWEEP, "--org-users", 5000, "--simulate", "--output-dir", out).exit_code == 0
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(out / "capacity.html")
        assert browser.evaluate("document.images.length") >= 2
        assert browser.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        assert "GPUs" in browser.evaluate("document.querySelector('table').textContent")
        browser.evaluate("document.querySelector('#selector').scrollIntoView()")  # the click lands on screen
        browser.click('#selector button[data-view="6"]')
        shown = browser.evaluate("[...document.querySelectorAll('section.view')].filter(s => !s.hidden).length")
        assert shown == 1
        assert browser.evaluate("document.querySelector('section.view[data-view=\"6\"]').hidden") is False
        assert browser.evaluate("document.querySelector('#selector [aria-selected=true]').textContent") == "64"
        assert browser.errors() == []
    finally:
        browser.close()


# ---- --url: sweep a server first ---------------------------------------------------------------------------


def test_url_sweeps_the_server_first_then_forecasts(tmp_path):
    from bench.fake_openai import FakeOpenAI

    fake = FakeOpenAI(delay_s=0.001).start_thread()
    out = tmp_path / "out"
    try:
        result = run("--url", fake.url, "--model", "fake", "--concurrency", "1,2", "--requests", 4,
                     "--prompt-tokens", 4, "--max-tokens", 8, "--org-users", 100, "--output-dir", out)
    finally:
        fake.stop()
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["kind"] == "sweep" and [lv["concurrency"] for lv in sweep["levels"]] == [1, 2]
    assert sweep["settings"]["slo_tpot_ms"] == 50.0  # goodput counted against the forecast's levels
    doc = json.loads((out / "capacity.json").read_text())
    assert doc["header"]["source"] == str(out / "sweep.json") and doc["header"]["url"] == fake.url
    assert doc["settings"]["concurrency"] == [1, 2] and doc["settings"]["max_tokens"] == "8"
    assert doc["replica"]["saturated"]  # a fake server that answers at once never crosses 50 ms
    assert doc["tokens"]["kv_tokens"] == 4096  # the fake's /info max_batch_total_tokens
    assert doc["organisation"]["gpus"] >= 2


def test_from_or_url_not_both_nor_neither(tmp_path):
    result = run("--url", "http://127.0.0.1:9", "--from", SWEEP)
    assert result.exit_code == 2 and "not both" in result.output
    result = run("--org-users", 10)
    assert result.exit_code == 2 and "give --from sweep.json" in result.output
    result = run("--url", "http://127.0.0.1:9", "--concurrency", "1", "--requests", 1, "--output-dir", tmp_path)
    assert result.exit_code == 1 and "cannot reach http://127.0.0.1:9" in result.output  # nothing listens there


def test_ctrl_c_during_the_sweep_keeps_the_finished_levels(tmp_path):
    out = tmp_path / "out"
    returncode, stderr = interrupt_second_level("from bench.capacity_command import capacity; capacity()", out)
    assert returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted: 1 finished level(s) kept" in stderr
    doc = json.loads((out / "sweep.json").read_text())
    assert [lv["concurrency"] for lv in doc["levels"]] == [1] and doc["stopped_early"].startswith("interrupted")
