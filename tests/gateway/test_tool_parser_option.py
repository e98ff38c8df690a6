"""`--tool-call-parser` from the command line to the requests it serves: the choices the CLI offers, a bad name
refused before anything starts (CLI and TOML alike), and a real `kvgate serve --tool-call-parser hermes` on the
tiny model (whose template shows no tool format: `auto` would read none) parsing a Hermes call that a regex makes
the random weights write, with tool_choice auto."""

from __future__ import annotations

import json

import httpx
import pytest
from click.testing import CliRunner

from gateway.config import ServerConfig
from kvgate.cli import main
from tests.gateway.tool_helpers import TOOLS
from tests.server import running_server

pytestmark = pytest.mark.usefixtures("deadline")

CALL = r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}</tool_call>'


def test_the_option_and_its_choices(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0 and "--tool-call-parser" in result.output
    assert "auto|none|hermes|llama3_json" in result.output.replace(" ", "")
    result = CliRunner().invoke(main, ["serve", "--tool-call-parser", "mistral"])
    assert result.exit_code == 2 and "mistral" in result.output
    toml = tmp_path / "server.toml"
    toml.write_text('[server]\ntool_call_parser = "llama3_json"\n')
    assert ServerConfig.from_toml(toml).tool_call_parser == "llama3_json"
    toml.write_text('[server]\ntool_call_parser = "mistral"\n')
    with pytest.raises(ValueError, match="tool_call_parser must be one of auto, none, hermes, llama3_json"):
        ServerConfig.from_toml(toml)


def test_serve_with_the_hermes_parser(tiny_llama_dir):
    body = {"messages": [{"role": "user", "content": "time?"}], "tools": TOOLS, "max_tokens": 80, "temperature": 0,
            "structured_outputs": {"regex": CALL}}
    with running_server(tiny_llama_dir, "--max-model-len", "256", "--tool-call-parser", "hermes") as server:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            whole = client.post("/chat/completions", json={"model": server.model, **body}).json()
            text = client.post("/chat/completions", json={"model": server.model, "tool_choice": "none", **body}).json()
    [choice] = whole["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time"
    assert json.loads(call["function"]["arguments"])["zone"] in ("UTC", "CET")
    # tool_choice none: the same text is left as it is
    assert text["choices"][0]["message"]["content"].startswith("<tool_call>")
    assert "tool_calls" not in text["choices"][0]["message"]
