"""Hermes' format, which Qwen2.5 and Qwen3 use: each call a JSON object in a tag,
`<tool_call>{"name": "f", "arguments": {...}}</tool_call>`; the text before the first tag is content."""

from __future__ import annotations

from gateway.tool_parsers.base import Call, ToolParser, call_at, partial_marker_at
from gateway.tool_parsers.json_scan import skip_ws

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesParser(ToolParser):
    name = "hermes"

    def start(self, text: str) -> int | None:
        i = text.find(OPEN)
        return None if i < 0 else i

    def hold_from(self, text: str) -> int:
        return partial_marker_at(text, (OPEN,))

    def calls(self, region: str) -> list[Call]:
        calls = []
        for block in region.split(OPEN)[1:]:
            body = block.split(CLOSE, 1)[0]  # a block's JSON never runs past its closing tag
            j = skip_ws(body, 0)
            if j < len(body) and body[j] == "{":
                calls.append(call_at(body, j, ("arguments", "parameters"))[0])
        return calls
