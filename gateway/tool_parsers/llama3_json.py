"""Llama 3.1 and 3.2's JSON format: `{"name": "f", "parameters": {...}}`, optionally after the `<|python_tag|>`
token, several calls separated by `;`. The text before the first call is content."""

from __future__ import annotations

import re

from gateway.tool_parsers.base import Call, ToolParser, call_at, partial_marker_at
from gateway.tool_parsers.json_scan import skip_ws

TAG = "<|python_tag|>"  # a special token: gone from the text unless skip_special_tokens is false
_CALL = re.compile(r'\{\s*"name"\s*:')
_CALL_BEGINNING = re.compile(r'\{\s*(?:"(?:n(?:a(?:m(?:e(?:"\s*)?)?)?)?)?)?\Z')  # a prefix of _CALL's match


class Llama3JsonParser(ToolParser):
    name = "llama3_json"

    def start(self, text: str) -> int | None:
        found = [i for i in (text.find(TAG), _first_call(text)) if i >= 0]
        return min(found) if found else None

    def hold_from(self, text: str) -> int:
        held = partial_marker_at(text, (TAG,))
        brace = text.rfind("{")  # only the last brace can begin a call that has not been written in full
        if brace >= 0 and _CALL_BEGINNING.match(text, brace):
            held = min(held, brace)
        return held

    def calls(self, region: str) -> list[Call]:
        j = len(TAG) if region.startswith(TAG) else 0
        calls = []
        while True:
            j = skip_ws(region, j)
            if j >= len(region) or region[j] != "{":
                return calls
            call, end = call_at(region, j, ("parameters", "arguments"))
            calls.append(call)
            if end is None:
                return calls
            j = skip_ws(region, end)
            if j >= len(region) or region[j] != ";":
                return calls
            j += 1


def _first_call(text: str) -> int:
    m = _CALL.search(text)
    return m.start() if m else -1
