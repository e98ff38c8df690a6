"""`kvgate bench soak`: a short soak of a real `kvgate serve` on the default model — clients leave mid-stream, the
samples and charts cover the run, and afterwards nothing runs and no KV block is held. And its parts: the
/metrics reading, the process-tree memory, the verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from bench.charts import points_of
from bench.process_memory import tree_rss_bytes
from bench.soak import scrape
from bench.soak_command import problems_of, soak


@pytest.mark.slow
def test_a_short_soak_leaves_nothing_behind(tmp_path):
    out = tmp_path / "soak"
    args = ["--clients", "6", "--duration", "6", "--sample-every", "1",
            "--warmup", "1", "--abort-fraction", "0.4", "--prompt-tokens", "uniform:4:40",
            "--max-tokens", "uniform:8:48", "--port", "8141", "--output-dir", str(out)]
    result = CliRunner().invoke(soak, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "soak.json").read_text())
    s = doc["summary"]
    assert s["errors"] == {} and s["http_5xx"] == 0 and s["server_errors_logged"] == 0, s
    assert s["completed"] >= 1 and s["aborted_by_client"] >= 0.2 * s["requests"]  # 0.4 drawn to leave
    assert s["requests"] == s["completed"] + s["aborted_by_client"]
    assert s["peak_kv_cache_usage"] > 0  # the load was seen ...
    assert s["kv_cache_usage_at_end"] == 0 and s["running_at_end"] == 0  # ... and every block came back
    assert s["server_rss_after_warmup"]["min"] > 0
    samples = doc["samples"]
    assert len(samples) >= 6 and samples[-1]["phase"] == "end"
    assert samples[-1]["requests_done"] == s["requests"]
    assert points_of(out / "soak-server-memory.png") == len(samples)
    assert points_of(out / "soak-load.png") == 3 * len(samples)


def test_scrape_sums_the_figures_a_sample_keeps():
    text = "\n".join([
        "# TYPE kvgate:num_requests_running gauge", 'kvgate:num_requests_running{model_name="m"} 3.0',
        "# TYPE kvgate:kv_cache_usage_perc gauge", 'kvgate:kv_cache_usage_perc{model_name="m"} 0.25',
        "# TYPE kvgate:http_responses counter", 'kvgate:http_responses_total{status="200"} 40.0',
        'kvgate:http_responses_total{status="503"} 2.0', 'kvgate:http_responses_total{status="500"} 1.0',
        'kvgate:http_responses_created{status="500"} 1.7e9', ""])
    assert scrape(text) == {"running": 3.0, "waiting": 0.0, "kv_cache_usage": 0.25, "http_5xx": 3.0}


def test_tree_memory_counts_the_children():
    child = subprocess.Popen([sys.executable, "-c", "b = bytearray(200 * 2**20); import time; time.sleep(30)"])
    try:
        alone = tree_rss_bytes(child.pid)
        for _ in range(100):  # until the child has touched its 200 MiB
            alone = tree_rss_bytes(child.pid)
            if alone > 150 * 2**20:
                break
            subprocess.run(["sleep", "0.05"])
        assert alone > 150 * 2**20
        assert tree_rss_bytes(os.getpid()) > alone  # the parent's tree includes its child
    finally:
        child.kill()
        child.wait()
    assert tree_rss_bytes(2**22 + 12345) is None


def test_problems_name_what_was_left_behind():
    clean = {"errors": {}, "http_5xx": 0, "kv_cache_usage_at_end": 0.0, "running_at_end": 0, "waiting_at_end": 0,
             "server_errors_logged": 0}
    assert problems_of(clean) == []
    leaky = {**clean, "kv_cache_usage_at_end": 0.02, "errors": {"http_500": 2}}
    assert problems_of(leaky) == ["errors {'http_500': 2}", "kv_cache_usage_at_end = 0.02"]
