"""Raw HTTP: malformed tools, tool_choice, response_format and vLLM's structured-output fields get a 400 in
OpenAI's error shape naming the field that was sent, streamed or not, before any byte of a stream; so do
grammars the engine cannot compile (it names `structured_outputs`; the gateway names the request's field). The
server goes on serving (the package's conftest checks no 5xx was counted)."""

from __future__ import annotations

import json

import pytest

from tests.gateway.http_helpers import CHAT, COMPLETIONS, assert_error, body_for
from tests.gateway.tool_helpers import TOOLS

pytestmark = pytest.mark.usefixtures("deadline")

BAD_PATTERN = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}, "required": ["a"]}
BAD_TOOL = [{"type": "function", "function": {"name": "f", "parameters": BAD_PATTERN}}]
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD_PATTERN}}

CHAT_CASES = [
    ({"tools": "f"}, "tools"), ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"), ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": "{}"}}}, "response_format"),
    ({"structured_outputs": {"regex": "a", "grammar": "b"}}, "structured_outputs"),
    ({"guided_choice": "yes"}, "guided_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "f", "arguments": "{x"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "code", "function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0].type"),
    # valid requests whose grammar the engine cannot compile
    ({"response_format": SCHEMA_FORMAT}, "response_format"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"guided_grammar": "start: ("}, "guided_grammar"),
    ({"tools": BAD_TOOL, "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$schema": 5}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "$schema": "http://json-schema.org/draft-04/schema#", "$defs": 5}}}], "tool_choice": "required"}, "tools"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "[" * 100000}}]}]}, "messages[0].tool_calls[0].function.arguments"),
    ({"tools": BAD_TOOL, "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools"),
]
COMPLETION_CASES = [
    ({"response_format": {"type": "xml"}}, "response_format"), ({"guided_json": "[]"}, "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"), ({"response_format": SCHEMA_FORMAT}, "response_format"),
]


def _id(case):
    return json.dumps(case)[:60]


@pytest.mark.parametrize("path, changes, param", [(CHAT, c, p) for c, p in CHAT_CASES]
                         + [(COMPLETIONS, c, p) for c, p in COMPLETION_CASES], ids=_id)
@pytest.mark.parametrize("stream", [False, True])
def test_refused(client, server, path, changes, param, stream):
    assert_error(client.post(path, json=body_for(path, server.model, stream=stream, **changes)), 400, param)


def test_a_body_nested_too_deeply(client, server):
    raw = json.dumps(body_for(CHAT, server.model, tools="@")).replace('"@"', "[" * 100000 + "]" * 100000)
    assert_error(client.post(CHAT, content=raw.encode()), 400, None, "invalid_json")


def test_served_after_the_refusals(client, server):
    body = body_for(CHAT, server.model, tools=TOOLS, tool_choice="required", max_tokens=100,
                    parallel_tool_calls=False, temperature=0)
    r = client.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] in ("get_weather", "get_time") and json.loads(call["function"]["arguments"])
