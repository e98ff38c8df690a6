"""The output of a forced tool_choice, which structured output makes well formed whatever the model: one
`{"name", "arguments"}` object for a named function, a JSON array of them for `required`. The model's own format
plays no part here."""

from __future__ import annotations

from gateway.tool_parsers.base import Call, ToolParser, call_at
from gateway.tool_parsers.json_scan import skip_ws


class NamedFunctionParser(ToolParser):
    """tool_choice names the function: the text is `{"name": <it>, "arguments": {...}}`, and the call's name is
    known before the model writes it (its first delta goes out at once)."""
    name = "named"

    def __init__(self, function: str) -> None:
        self.function = function

    def start(self, text: str) -> int | None:
        return 0

    def calls(self, region: str) -> list[Call]:
        j = skip_ws(region, 0)
        if j >= len(region) or region[j] != "{":
            return [Call(self.function, "")]
        call = call_at(region, j, ("arguments",))[0]
        return [Call(self.function, call.arguments, call.done)]


class RequiredCallsParser(ToolParser):
    """tool_choice `required`: the text is `[{"name": ..., "arguments": {...}}, ...]`."""
    name = "required"

    def start(self, text: str) -> int | None:
        return 0

    def calls(self, region: str) -> list[Call]:
        j = skip_ws(region, 0)
        if j >= len(region) or region[j] != "[":
            return []
        calls = []
        j = skip_ws(region, j + 1)
        while j < len(region) and region[j] == "{":
            call, end = call_at(region, j, ("arguments",))
            calls.append(call)
            if end is None:
                break
            j = skip_ws(region, end)
            if j >= len(region) or region[j] != ",":
                break
            j = skip_ws(region, j + 1)
        return calls
