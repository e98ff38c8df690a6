"""Ctrl-C in the middle of a sweep, for real: the command runs in a subprocess against a fake server and gets
SIGINT once its first level is written, during the second."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parents[2]


def interrupt_second_level(code: str, out: Path) -> tuple[int, str]:
    """Run `code` (a Python line calling a Click command) with two one-request-a-second levels writing to `out`;
    returns its exit code and stderr."""
    fake = FakeOpenAI(delay_s=0.005).start_thread()
    args = ["--url", fake.url, "--model", "fake", "--concurrency", "1,2", "--requests", "3", "--max-tokens", "150",
            "--prompt-tokens", "4", "--output-dir", str(out)]  # a request takes about 0.75 s
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while not (out / "sweep.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # during the second level
        stderr = proc.communicate(timeout=30)[1]
        return proc.returncode, stderr
    finally:
        proc.kill()
        fake.stop()
