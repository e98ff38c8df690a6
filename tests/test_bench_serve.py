"""`kvgate bench serve` (serve-N) on the default model (the load generator's token-id prompts need a real
vocabulary): both sides generate every token of the same requests."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvgate.cli import main


@pytest.mark.slow
def test_serve_n_compares_server_with_offline():
    args = ["bench", "serve", "--concurrency", "3", "--prompt-tokens", "12",
            "--max-tokens", "6", "--port", "8137", "--num-kv-blocks", "64", "--max-model-len", "256"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["workload"] == "serve-3"
    assert report["offline"]["output_tokens"] == 18
    assert report["served"]["output_tokens"] == 18 and report["served"]["failed"] == 0
    assert report["served_vs_offline"] > 0
