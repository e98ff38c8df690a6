"""`kvgate bench offline`: the workloads as docs/workloads.md defines them, kvgate and transformers run on the
same prompts (scaled down, on a tiny checkpoint), and the --output document."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from click.testing import CliRunner

from bench.offline import run_hf, run_kvgate
from bench.workloads import WORKLOADS, make_requests, shifted
from engine.config import EngineConfig
from kvgate.cli import main

pytestmark = pytest.mark.usefixtures("deadline")

VOCAB = 151936


def test_nano_draws_what_nano_vllm_draws():
    """nano-vllm's bench.py: seed(0); prompts [[randint(0, 10000) for _ in range(randint(100, 1024))] x 256],
    then max_tokens=randint(100, 1024) for each of the 256."""
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(256)]
    outputs = [rng.randint(100, 1024) for _ in range(256)]
    nano = make_requests(WORKLOADS["nano"], VOCAB)
    assert nano.prompts == prompts and nano.output_lens == outputs
    assert all(100 <= len(p) <= 1024 for p in prompts) and all(100 <= n <= 1024 for n in outputs)
    assert WORKLOADS["nano"].temperature == 0.6
    assert make_requests(WORKLOADS["nano"], VOCAB) == nano  # seed-stable

    fixed = make_requests(WORKLOADS["nano-fixed"], VOCAB)
    assert fixed.prompts == nano.prompts and fixed.output_lens == [512] * 256


@pytest.mark.parametrize("name, prompt_len, output_len", [("bs1", 128, 256), ("ttft-8k", 8192, 1),
                                                          ("batch32", 128, 256)])
def test_fixed_shape_workloads(name, prompt_len, output_len):
    reqs = make_requests(WORKLOADS[name], VOCAB)
    assert len(reqs.prompts) == (32 if name == "batch32" else 1)
    assert {len(p) for p in reqs.prompts} == {prompt_len} and set(reqs.output_lens) == {output_len}
    assert WORKLOADS[name].temperature == 0.0


def test_token_ids_stay_in_a_small_vocabulary_and_shift_apart():
    reqs = make_requests(WORKLOADS["bs1"], 512)
    assert max(reqs.prompts[0]) < 512
    moved = shifted(reqs.prompts, 3, 512)
    assert all(m == (t + 3) % 512 for m, t in zip(moved[0], reqs.prompts[0]))
    assert shifted(reqs.prompts, 0, 512) is reqs.prompts


SMALL = {  # the real definitions, scaled down to a tiny model on a CPU
    "nano": dataclasses.replace(WORKLOADS["nano"], num_requests=5, prompt_len=(5, 40), output_len=(3, 12)),
    "nano-fixed": dataclasses.replace(WORKLOADS["nano-fixed"], num_requests=5, prompt_len=(5, 40), output_len=8),
    "bs1": dataclasses.replace(WORKLOADS["bs1"], prompt_len=16, output_len=12),
    "ttft-8k": dataclasses.replace(WORKLOADS["ttft-8k"], prompt_len=64),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_kvgate_and_hf_generate_the_same_token_counts(name, tiny_qwen3_dir):
    workload = SMALL[name]
    config = EngineConfig(model=str(tiny_qwen3_dir), in_process=True, num_kv_blocks=128, block_size=8)
    expected = make_requests(workload, 512).output_tokens
    ours, theirs = run_kvgate(config, workload), run_hf(config, workload)
    for result in (ours, theirs):
        assert result["workload"] == name and result["requests"] == workload.num_requests
        assert result["output_tokens"] == expected and result["seconds"] > 0
        assert result["output_tokens_per_s"] == pytest.approx(expected / result["seconds"], rel=0.01)
        assert result["dtype"] == "float32"
        assert ("ttft_ms" in result) == workload.ttft
    assert ours["backend"] == "kvgate" and ours["max_batch_total_tokens"] == 128 * 8
    assert ours["cached_prompt_tokens"] == 0  # warm-up and repeats never feed the timed prefill from the cache
    assert ours["temperature"] == workload.temperature and theirs["temperature"] == 0.0
    assert theirs["attention"] and ("continuous batching" in theirs["api"]) == name.startswith("nano")
    if workload.ttft:
        assert ours["ttft_ms_engine"] > 0
    for result in (ours, theirs):  # decode speed leaves the prefill out: above the whole call's tokens/s
        assert ("decode_tokens_per_s" in result) == (name == "bs1")
        if name == "bs1":
            assert result["decode_tokens_per_s"] > (expected - 1) / result["seconds"]


def test_cli_writes_one_document_with_a_header(tmp_path, monkeypatch, tiny_qwen3_dir):
    monkeypatch.setitem(WORKLOADS, "bs1", SMALL["bs1"])
    monkeypatch.setitem(WORKLOADS, "ttft-8k", dataclasses.replace(SMALL["ttft-8k"], prompt_len=2000))
    out = tmp_path / "results.json"
    result = CliRunner().invoke(main, ["bench", "offline", "--workload", "bs1,ttft-8k", "--backend", "kvgate,hf",
                                       "--model", str(tiny_qwen3_dir), "--num-kv-blocks", "64", "--output", str(out)])
    # the engine refuses a prompt past its 1024-token context: that run is an error line, the others go on
    assert result.exit_code == 1 and "1 run(s) failed: ttft-8k/kvgate" in result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    document = json.loads(out.read_text())
    assert document["results"] == lines
    assert [(r["workload"], r["backend"]) for r in lines] == [("bs1", "kvgate"), ("bs1", "hf"), ("ttft-8k", "kvgate"),
                                                               ("ttft-8k", "hf")]
    assert "ContextTooLongError" in lines[2]["error"] and "error" not in lines[3]
    header = document["header"]
    assert header["device"] and header["versions"]["torch"] and header["versions"]["transformers"]
    assert "triton" in header["versions"] and header["command"]
    assert header["engine_config"]["model"] == str(tiny_qwen3_dir) and header["engine_config"]["num_kv_blocks"] == 64
    assert all(r["model"] == str(tiny_qwen3_dir) and r["device"] == header["device"] for r in lines)


def test_cli_names_an_unknown_workload():
    result = CliRunner().invoke(main, ["bench", "offline", "--workload", "nano,huge"])
    assert result.exit_code == 2 and "unknown workload 'huge'" in result.output
