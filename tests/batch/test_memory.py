"""Memory stays flat however long the input: 100,000 lines peak at about what 10,000 lines do. The engine is
FakeEngineCore (no model: a token per step for each request), in the batch process itself so that its memory
counts too; each run in a fresh subprocess, so that its peak RSS is its own. Both the process's ru_maxrss and
the peak RSS sampled during the run itself are compared (the start-up's peak can hide the run's)."""

from __future__ import annotations

import json
import subprocess
import sys

import orjson
import pytest

# no 120 s `deadline` here: the two runs take 30-80 s on a small shared CPU; each has its own timeout instead
pytestmark = pytest.mark.slow

BOUND_MB = 40

_RUN = """
import json, resource, sys, threading, time
from batch.job import BatchJob
from bench.fake_core import FakeEngineCore
from engine.config import EngineConfig
from engine.llm import AsyncLLM

def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

source, output, model = sys.argv[1:]
config = EngineConfig(model=model, max_num_seqs=256, in_process=True)
engine = AsyncLLM(config=config, core_class=FakeEngineCore)  # started first: its start-up is not the run's
job = BatchJob(source, output, engine_config=config, engine_factory=lambda: engine)
peak, running = [rss_kb()], True

def sample():  # the run's own peak: ru_maxrss may be the start-up's (imports, tokenizer), hiding the run's
    while running:
        peak.append(max(peak.pop(), rss_kb()))
        time.sleep(0.02)

sampler = threading.Thread(target=sample)
sampler.start()
start = time.perf_counter()
summary = job.run()
wall_s = time.perf_counter() - start
running = False
sampler.join()
print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "run_peak_kb": peak[0],
                  "wall_s": wall_s, "lines": summary.lines, "failed": summary.failed}))
"""

def _run(tmp_path, model, lines: int) -> dict:
    source, output = tmp_path / f"in{lines}.jsonl", tmp_path / f"out{lines}.jsonl"
    with open(source, "wb") as f:
        f.writelines(orjson.dumps({"prompt": f"p{i}", "max_tokens": 2}) + b"\n" for i in range(lines))
    done = subprocess.run([sys.executable, "-c", _RUN, str(source), str(output), str(model)], capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["lines"] == lines and report["failed"] == 0, report
    with open(output, "rb") as f:
        ids = [orjson.loads(line)["custom_id"] for line in f]
    assert ids == [f"line-{i}" for i in range(lines)]  # every line, once, in order
    output.unlink()
    return report


def test_peak_memory_does_not_grow_with_the_input(tmp_path, tiny_llama_dir):
    small = _run(tmp_path, tiny_llama_dir, 10_000)
    large = _run(tmp_path, tiny_llama_dir, 100_000)
    growth_mb = (large["maxrss_kb"] - small["maxrss_kb"]) / 1024
    run_growth_mb = (large["run_peak_kb"] - small["run_peak_kb"]) / 1024
    print(f"\nru_maxrss: {small['maxrss_kb'] / 1024:.0f} MB for 10,000 lines, {large['maxrss_kb'] / 1024:.0f} MB "
          f"for 100,000 (+{growth_mb:.1f} MB); peak RSS during the run: {small['run_peak_kb'] / 1024:.0f} MB, "
          f"{large['run_peak_kb'] / 1024:.0f} MB (+{run_growth_mb:.1f} MB); {large['lines'] / large['wall_s']:.0f} "
          f"lines/s ({large['wall_s']:.1f} s for 100,000)")
    assert growth_mb < BOUND_MB, (small, large)
    assert run_growth_mb < BOUND_MB, (small, large)
