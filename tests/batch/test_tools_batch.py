"""OpenAI Batch bodies with response_format, vLLM's structured-output fields and tools: the runner passes them
to the gateway's Service like any other field, so each line gets what the server would answer (calls forced by
tool_choice, JSON that validates), and a malformed one an error line naming the field."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.batch.helpers import chat, completion, error_of, ok_body, read_jsonl, write_jsonl
from tests.gateway.tool_helpers import ARGUMENT_SCHEMAS, TOOLS

pytestmark = pytest.mark.usefixtures("deadline", "in_process_core")

WEATHER = ARGUMENT_SCHEMAS["get_weather"]


def test_structured_output_and_tools_in_batch_bodies(tmp_path, batch_cli):
    rows = [
        chat("schema", max_tokens=60, response_format={"type": "json_schema",
                                                        "json_schema": {"name": "w", "schema": WEATHER}}),
        chat("required", max_tokens=100, tools=TOOLS, tool_choice="required", parallel_tool_calls=False),
        chat("named", max_tokens=60, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}),
        completion("choice", max_tokens=8, guided_choice=["yes", "no"]),
        chat("bad-choice", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
        chat("bad-format", response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": [1]}}),
    ]
    out = tmp_path / "out.jsonl"
    result = batch_cli(write_jsonl(tmp_path / "in.jsonl", rows), "-o", out, "--temperature", "0")
    assert result.exit_code == 1, result.output  # the two bad lines
    got = {line["custom_id"]: line for line in read_jsonl(out)}

    [choice] = ok_body(got["schema"])["choices"]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), WEATHER)
    for custom_id, names in (("required", ("get_weather", "get_time")), ("named", ("get_time",))):
        [choice] = ok_body(got[custom_id])["choices"]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
        [call] = choice["message"]["tool_calls"]
        assert call["function"]["name"] in names and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), ARGUMENT_SCHEMAS[call["function"]["name"]])
    assert ok_body(got["choice"])["choices"][0]["text"] in ("yes", "no")
    assert error_of(got["bad-choice"], 400)["param"] == "tool_choice"
    assert error_of(got["bad-format"], 400)["param"] == "response_format"
