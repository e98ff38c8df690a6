"""Helpers of the tool-call tests: feeding a text to a ToolCalls stream in given pieces and adding the deltas up
as a client does, and the tools the tests declare (small enums and booleans: a random-weight model constrained
to them ends its JSON within a few tokens)."""

from __future__ import annotations

from gateway.tool_calls import ToolCalls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                    "metric": {"type": "boolean"}},
                   "required": ["city", "metric"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ARGUMENT_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def streamed(tools: ToolCalls, pieces: list[str]) -> tuple[str | None, list[dict], bool]:
    """(content, [{"name", "arguments"}], called) as a client accumulates the deltas of these text pieces, each
    delta checked the way OpenAI sends them (id, type and name first, with its index, then arguments alone)."""
    stream = tools.stream()
    content, calls = "", {}
    for i, piece in enumerate(pieces):
        text, deltas = stream.feed(piece, final=i == len(pieces) - 1)
        content += text
        for d in deltas:
            if d["index"] not in calls:
                assert d["index"] == len(calls), deltas
                assert d["id"].startswith("call_") and d["type"] == "function" and d["function"]["name"], d
                calls[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}, d
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)], stream.called


def whole(tools: ToolCalls, text: str, finish: str = "stop") -> tuple[str | None, list[dict], str]:
    message, finish = tools.message(text, finish)
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in message.get("tool_calls", [])]
    return message["content"], calls, finish


def pieces_of(text: str, cuts) -> list[str]:
    cuts = sorted(set(c for c in cuts if 0 < c < len(text)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])] or [""]
