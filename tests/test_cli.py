"""The `kvgate` command: `--help` at once, `python -m kvgate`, engine options derived from EngineConfig (generate
and chat: test_generate_chat.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvgate.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_help_lists_every_engine_option(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    for flag in ("--max-num-batched-tokens", "--num-kv-blocks", "--engine-seed", "--no-enable-prefix-caching",
                 "--max-tokens", "--temperature", "--seed", "--system"):
        assert flag in result.output
    assert "--ignore-eos" not in result.output  # hidden: for tests and benchmarks


def test_bad_engine_option_is_a_usage_error():
    result = CliRunner().invoke(main, ["generate", "--block-size", "12", "hi"])
    assert result.exit_code == 2
    assert "block_size must be a power of two" in result.output


def test_help_imports_no_torch():
    """`kvgate --help` answers at once: the commands import torch and transformers only when they run."""
    code = ("import sys; from kvgate.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "serve" in out.stdout, out.stderr


def test_python_m_kvgate():
    out = subprocess.run([sys.executable, "-m", "kvgate", "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("Usage: kvgate ")
