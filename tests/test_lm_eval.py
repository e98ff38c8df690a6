"""lm-evaluation-harness scores a multiple-choice task through `kvgate serve` (its `local-completions` model:
echo with logprobs on /v1/completions, max_tokens 1) exactly as through transformers (its `hf` model) on the same
weights: the embedded SmolLM2-135M and tests/lm_eval_task (40 items, no download). Both runs are the commands
docs/benchmarks.md gives; the numbers there come from this test."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import running_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TASK = "kvgate_mc"
ITEMS = 40


def lm_eval(out: Path, *args: str) -> tuple[dict, dict[int, dict]]:
    """Run `python -m lm_eval` from the repository root on the task; (its results, its samples by doc id)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", *args, "--tasks", TASK, "--include_path", "tests/lm_eval_task",
           "--batch_size", "8", "--output_path", str(out), "--log_samples"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [results] = glob.glob(f"{out}/**/results_*.json", recursive=True)
    [samples] = glob.glob(f"{out}/**/samples_{TASK}_*.jsonl", recursive=True)
    rows = [json.loads(line) for line in Path(samples).read_text().splitlines()]
    return json.loads(Path(results).read_text())["results"][TASK], {r["doc_id"]: r for r in rows}


def test_local_completions_scores_as_hf(tmp_path):
    pytest.importorskip("lm_eval")
    from engine.model_source import resolve_model

    model_dir = resolve_model(None)  # the embedded model, converted once to a transformers directory
    hf, hf_samples = lm_eval(tmp_path / "hf", "--model", "hf", "--device", "cpu",
                             "--model_args", f"pretrained={model_dir},dtype=float32")
    with running_server(None) as server:
        api, api_samples = lm_eval(
            tmp_path / "api", "--model", "local-completions", "--model_args",
            f"model={server.model},base_url={server.base_url}/completions,tokenizer={model_dir},"
            "tokenizer_backend=huggingface,num_concurrent=4,max_retries=1")

    assert len(hf_samples) == len(api_samples) == ITEMS
    assert api["acc,none"] == hf["acc,none"] and api["acc_norm,none"] == hf["acc_norm,none"]
    assert hf["acc,none"] > 0.5, hf  # well above chance (0.25): the task measures something
    worst = 0.0
    for doc_id, ours in api_samples.items():
        theirs = hf_samples[doc_id]
        assert (ours["acc"], ours["acc_norm"]) == (theirs["acc"], theirs["acc_norm"]), doc_id
        for [(ll, greedy)], [(ref_ll, ref_greedy)] in zip(ours["resps"], theirs["resps"]):
            worst = max(worst, abs(float(ll) - float(ref_ll)))
            assert greedy == ref_greedy, doc_id
    assert worst < 1e-3, f"a choice's loglikelihood differs by {worst}"
    print(f"\nacc {hf['acc,none']:.3f} (hf) {api['acc,none']:.3f} (kvgate); acc_norm {hf['acc_norm,none']:.3f} "
          f"{api['acc_norm,none']:.3f}; largest loglikelihood difference {worst:.2e}")
