"""Fixtures of the batch tests.

`batch_cli(*args, input=None)` runs `kvgate batch run ARGS --model <tiny llama> --max-model-len 256` through
Click's CliRunner. With `in_process_core`, the engine core runs in the test's own process instead of a spawned
one: a run then takes a fraction of a second instead of 3-6 s of imports on a small CPU; everything else
(the CLI, BatchJob, AsyncLLM, the gateway's Service) is the real thing. The tests that start `kvgate serve` or
a `kvgate batch run` subprocess use the spawned core as users do.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kvgate.cli import main
from tests.batch.helpers import MAX_LEN, in_process_engine


@pytest.fixture
def in_process_core(monkeypatch):
    in_process_engine(monkeypatch)


@pytest.fixture(scope="session")
def batch_cli(tiny_llama_dir):
    def run(*args: str, input: str | bytes | None = None, engine: bool = True):
        model = ["--model", str(tiny_llama_dir), "--max-model-len", str(MAX_LEN)] if engine else []
        return CliRunner().invoke(main, ["batch", "run", *map(str, args), *model], input=input)

    return run


@pytest.fixture(scope="session")
def merge_cli():
    def run(*args: str):
        return CliRunner().invoke(main, ["batch", "merge", *map(str, args)])

    return run
