"""The `kvgate` command: engine options derived from EngineConfig (generate and chat: test_generate_chat.py)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kvgate.cli import main


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
