"""What the capacity tests share: the hand-made sweep result and ways to run the command on it."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from bench.capacity_command import capacity

SWEEP = Path(__file__).parent / "data" / "sweep-example.json"
PER_PERSON = 0.1 * 20 / 3600  # the default active share and requests an hour: requests/s per person


def levels():
    return json.loads(SWEEP.read_text())["levels"]


def run(*args):
    result = CliRunner().invoke(capacity, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def write(tmp_path, doc, name="sweep.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path
