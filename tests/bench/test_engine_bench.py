"""`kvgate bench engine` on a tiny checkpoint on the CPU: the result document has every figure for every batch
size and its figures agree with its samples, the charts show as many points as the data, the HTML report's
selector works in Chromium, bad options are refused before any weights load, and Ctrl-C keeps what finished."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bench import charts
from bench.engine_bench import EngineBench
from bench.engine_command import engine
from bench.stats import summary
from engine.structured_output import Bitmasks
from tests.browser import Browser

pytestmark = pytest.mark.usefixtures("deadline")

PNG = b"\x89PNG\r\n\x1a\n"
BATCHES, PROMPT, DECODE, RUNS = [1, 2, 4], 40, 8, 2  # 40: two full blocks the prefix cache could serve
SUMMARY_KEYS = {"n", "mean", "std", "min", "p50", "p90", "p99", "max"}
LEVEL_KEYS = {"batch_size", "runs", "prompt_tokens_per_run", "prefill", "decode", "memory", "preemptions",
              "prefix_cache_hit_tokens", "wall_s"}
MEMORY_KEYS = {"kind", "weights_bytes", "kv_cache_bytes", "kv_cache_tokens", "peak_allocated_bytes",
               "peak_activation_bytes", "free_device_bytes", "total_device_bytes", "rss_bytes", "peak_rss_bytes"}


def invoke(model_dir, out_dir, *args):
    return CliRunner().invoke(engine, ["--model", str(model_dir), "--output-dir", str(out_dir), *args])


@pytest.fixture(scope="module")
def measured(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-engine")
    result = invoke(tiny_llama_dir, out, "--batch-sizes", ",".join(map(str, BATCHES)), "--prompt-len", str(PROMPT),
                    "--decode-len", str(DECODE), "--runs", str(RUNS), "--warmups", "1")
    assert result.exit_code == 0, result.output
    return result, out, json.loads((out / "engine.json").read_text())


def test_the_document_has_every_figure_for_every_batch_size(measured):
    result, out, doc = measured
    assert doc["kind"] == "engine" and doc["stopped_early"] is None
    assert {"device", "versions", "engine_config", "command", "started", "engine_info"} <= set(doc["header"])
    assert doc["header"]["engine_info"]["step_loop"] == "plain"  # the CPU measures the plain loop, and says so
    assert any("plain step loop" in note for note in doc["notes"])
    assert doc["header"]["engine_config"]["in_process"] is True
    expected = {"batch_sizes": BATCHES, "prompt_len": PROMPT, "decode_len": DECODE, "runs": RUNS, "warmups": 1,
                "temperature": 0.0, "top_p": 1.0, "top_k": 0}
    assert {key: doc["settings"][key] for key in expected} == expected
    assert [level["batch_size"] for level in doc["levels"]] == BATCHES
    for level in doc["levels"]:
        assert set(level) == LEVEL_KEYS
        assert level["prompt_tokens_per_run"] == level["batch_size"] * PROMPT
        for phase in ("prefill", "decode"):
            assert SUMMARY_KEYS == set(level[phase]["latency_s"]) == set(level[phase]["tokens_per_s"])
        assert level["prefill"]["latency_s"]["n"] == RUNS == len(level["prefill"]["samples_s"])
        # every prompt fits one step's token budget: one prefill step, then decode_len full-batch steps per run
        assert level["prefill"]["steps_per_run"] == [1] * RUNS
        assert level["decode"]["steps_per_run"] == [DECODE] * RUNS
        assert level["decode"]["partial_steps_per_run"] == [0] * RUNS
        assert len(level["decode"]["samples_s"]) == level["decode"]["latency_s"]["n"] == RUNS * DECODE
        memory = level["memory"]
        assert set(memory) == MEMORY_KEYS and memory["kind"] == "cpu"
        assert memory["weights_bytes"] > 0 and memory["kv_cache_bytes"] > 0 and memory["kv_cache_tokens"] > 0
        assert memory["peak_rss_bytes"] >= memory["rss_bytes"] > 0
        assert level["preemptions"] == 0 and level["prefix_cache_hit_tokens"] == 0  # every run's prompts are new
    assert doc["levels"][0]["memory"]["kv_cache_tokens"] == doc["header"]["engine_info"]["max_batch_total_tokens"]
    assert "Engine benchmark" in result.output and "wrote" in result.output


def test_throughput_agrees_with_latency(measured):
    _, _, doc = measured
    for level in doc["levels"]:
        b = level["batch_size"]
        for phase, tokens in (("prefill", b * PROMPT), ("decode", b)):
            samples = level[phase]["samples_s"]
            latency, rate = level[phase]["latency_s"], level[phase]["tokens_per_s"]
            assert all(s > 0 for s in samples)
            assert latency == summary(samples)  # the statistics are the samples'
            assert rate["max"] == pytest.approx(tokens / latency["min"])
            assert rate["min"] == pytest.approx(tokens / latency["max"])
            assert rate["p50"] == pytest.approx(tokens / latency["p50"], rel=0.25)
        decode = level["decode"]
        assert decode["overall_tokens_per_s"] == pytest.approx(b * len(decode["samples_s"]) / sum(decode["samples_s"]))
        timed = sum(level["prefill"]["samples_s"]) + sum(decode["samples_s"])
        assert timed < level["wall_s"]  # the warm-up and the timed runs: more than the timed samples


def test_the_charts_show_every_sample_and_batch_size(measured):
    _, out, doc = measured
    for level in doc["levels"]:
        b = level["batch_size"]
        for phase in ("prefill", "decode"):
            path = out / f"{phase}_latency_b{b}.png"
            assert path.read_bytes().startswith(PNG)
            assert charts.points_of(path) == len(level[phase]["samples_s"])
    assert charts.points_of(out / "prefill_throughput_latency.png") == len(BATCHES)
    assert charts.points_of(out / "decode_throughput_latency.png") == len(BATCHES)
    assert charts.points_of(out / "memory.png") == 3 * len(BATCHES)  # weights, KV cache, peak activation


@pytest.mark.skipif(not Browser.available(), reason="Debian's chromium is not installed")
def test_the_report_switches_batch_sizes_in_chromium(measured, tmp_path):
    _, out, _ = measured
    page = (out / "engine.html").read_text()
    assert page.count("data:image/png;base64,") == 3 + 2 * len(BATCHES)
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(out / "engine.html")
        labels = browser.evaluate("[...document.querySelectorAll('#selector button')].map(b => b.textContent)")
        assert labels == [f"batch {b}" for b in BATCHES]
        assert browser.evaluate("document.querySelectorAll('table')[0].tBodies[0].rows.length") == len(BATCHES)
        visible = "[...document.querySelectorAll('section.view')].filter(s => !s.hidden).map(s => s.textContent)"
        browser.evaluate("document.querySelector('#selector').scrollIntoView()")  # below the summary's charts
        browser.click('#selector button[data-view="2"]')
        shown = browser.evaluate(visible)
        assert len(shown) == 1 and shown[0].startswith("batch 4")
        images = "document.querySelectorAll('section.view:not([hidden]) img')"
        assert browser.evaluate(f"[...{images}].map(i => i.alt)") == ["prefill_latency_b4", "decode_latency_b4"]
        assert browser.evaluate(f"[...{images}].every(i => i.complete && i.naturalWidth > 0)")
        assert browser.screenshot(tmp_path / "engine.png").read_bytes().startswith(PNG)
        assert browser.errors() == []
    finally:
        browser.close()


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "1,0"], "positive integers"),
    (["--batch-sizes", "two"], "comma-separated integers"),
    (["--prompt-len", "1000", "--decode-len", "100"], "exceeds the model's context of 1024"),
    (["--prompt-len", "8", "--decode-len", "8", "--max-model-len", "16"], "exceeds the model's context of 16"),
    (["--runs", "0"], "--runs"),
])
def test_bad_options_are_refused_with_a_clear_message(tiny_llama_dir, tmp_path, monkeypatch, args, message):
    monkeypatch.setattr(EngineBench, "__init__", lambda *a: pytest.fail("the engine must not start"))
    result = invoke(tiny_llama_dir, tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_model_that_is_not_there_is_an_error_not_a_traceback(tmp_path):
    result = CliRunner().invoke(engine, ["--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "missing" in result.output and not (tmp_path / "out").exists()


def test_ctrl_c_keeps_the_finished_batch_sizes(tiny_llama_dir, tmp_path, monkeypatch):
    original = EngineBench.run_once

    def run_once(self, prompts, tag):
        if tag.startswith("b4-"):
            raise KeyboardInterrupt  # as Ctrl-C arrives, inside the batch's loop
        return original(self, prompts, tag)

    monkeypatch.setattr(EngineBench, "run_once", run_once)
    result = invoke(tiny_llama_dir, tmp_path, "--batch-sizes", "1,4", "--max-num-seqs", "2", "--prompt-len", "8",
                    "--decode-len", "3", "--runs", "1", "--warmups", "0")
    assert result.exit_code == 130, result.output
    doc = json.loads((tmp_path / "engine.json").read_text())
    assert [level["batch_size"] for level in doc["levels"]] == [1]
    assert doc["stopped_early"] == "interrupted (Ctrl-C) during batch size 4"
    # batch sizes above max_num_seqs: it is raised to the largest, and the notes say so
    assert doc["header"]["engine_config"]["max_num_seqs"] == 4
    assert "max_num_seqs raised from 2 to 4, the largest batch size" in doc["notes"]
    assert "Stopped early" in (tmp_path / "engine.html").read_text()
    assert charts.points_of(tmp_path / "decode_throughput_latency.png") == 1


def test_a_chunked_prefill_samples_only_full_batch_steps(tiny_llama_dir, tmp_path):
    """4 prompts of 16 tokens with 16 tokens a step: the prefill takes several steps, the requests whose prompts
    finished first run ahead, and the steps where fewer than 4 sequences get a token are counted, not sampled."""
    result = invoke(tiny_llama_dir, tmp_path, "--batch-sizes", "4", "--max-num-batched-tokens", "16",
                    "--prompt-len", "16", "--decode-len", "6", "--runs", "1", "--warmups", "0")
    assert result.exit_code == 0, result.output
    decode = json.loads((tmp_path / "engine.json").read_text())["levels"][0]["decode"]
    prefill = json.loads((tmp_path / "engine.json").read_text())["levels"][0]["prefill"]
    assert prefill["steps_per_run"][0] >= 4
    assert decode["partial_steps_per_run"][0] > 0
    assert 0 < decode["steps_per_run"][0] < 6 and len(decode["samples_s"]) == decode["steps_per_run"][0]


def test_a_json_schema_constrains_every_request_and_a_bad_one_is_refused(tiny_llama_dir, tmp_path, monkeypatch):
    schema = {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 50}},
              "required": ["xs"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    masked = []
    fill = Bitmasks.fill
    monkeypatch.setattr(Bitmasks, "fill", lambda self, matchers: masked.append(len(matchers)) or fill(self, matchers))
    result = invoke(tiny_llama_dir, tmp_path / "out", "--batch-sizes", "2", "--prompt-len", "8", "--decode-len", "6",
                    "--runs", "1", "--warmups", "0", "--json-schema", str(tmp_path / "schema.json"))
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "engine.json").read_text())
    assert doc["settings"]["json_schema"] == schema
    assert doc["levels"][0]["decode"]["steps_per_run"] == [6]  # the grammar cannot end within 6 tokens
    assert masked == [2] * 7  # every step's two rows were masked: the first token and six decode steps
    (tmp_path / "bad.json").write_text('{"type": "nope"}')
    monkeypatch.setattr(EngineBench, "__init__", lambda *a: pytest.fail("the engine must not start"))
    result = invoke(tiny_llama_dir, tmp_path / "bad-out", "--json-schema", str(tmp_path / "bad.json"))
    assert result.exit_code == 2 and "--json-schema" in result.output and "nope" in result.output
