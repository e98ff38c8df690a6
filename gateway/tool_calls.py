"""From the model's text to OpenAI's tool calls, whole or streamed, for any parser.

Streaming re-parses the text so far at each delta and sends what grew since the last one: new content, a new
call's id, type and name, more of a call's arguments. Parsers therefore only parse, and the deltas add up to
the non-streamed message because both come from the same parse. Until a call begins, text that may be the
beginning of a call marker (and trailing whitespace, which a call would drop) is held back."""

from __future__ import annotations

import uuid

from gateway.tool_parsers.base import Call, ToolParser


def split(parser: ToolParser, text: str, final: bool, max_calls: int | None = None) -> tuple[str, list[Call]]:
    """(content, named calls) of text as far as it goes. Content only grows from one call to the next, as do
    the calls and their arguments; if the text ends with no named call, all of it is content."""
    start = parser.start(text)
    if start is None:
        return (text if final else text[:parser.hold_from(text)].rstrip()), []
    calls = [c for c in parser.calls(text[start:]) if c.name]
    if final and not calls:
        return text, []
    return text[:start].rstrip(), calls[:max_calls]


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_call(call: Call) -> dict:
    return {"id": call_id(), "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def finish_reason(finish: str | None, called: bool) -> str | None:
    """`tool_calls` when the model stopped after calling; a call cut short by max_tokens says `length`."""
    return "tool_calls" if called and finish == "stop" else finish


class ToolCalls:
    """How one response's text becomes tool calls: its parser, and how many calls it may make."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None) -> None:
        self.parser, self.max_calls = parser, max_calls

    def message(self, text: str, finish: str | None) -> tuple[dict, str | None]:
        """The non-streamed message's content and tool_calls, and the choice's finish_reason."""
        content, calls = split(self.parser, text, True, self.max_calls)
        if not calls:
            return {"content": content}, finish
        return {"content": content or None, "tool_calls": [tool_call(c) for c in calls]}, finish_reason(finish, True)

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


class ToolCallStream:
    """One choice's stream: feed it each text delta, get the delta's content and tool_calls."""

    def __init__(self, tools: ToolCalls) -> None:
        self.tools, self.text, self.content_sent = tools, "", 0
        self.ids: list[str] = []
        self.arguments_sent: list[int] = []

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def feed(self, delta: str, final: bool) -> tuple[str, list[dict]]:
        self.text += delta
        content, calls = split(self.tools.parser, self.text, final, self.tools.max_calls)
        new_content = content[self.content_sent:]
        self.content_sent = max(self.content_sent, len(content))
        deltas: list[dict] = []
        for index, call in enumerate(calls):
            entry = None
            if index == len(self.ids):  # the call's first delta: id, type and name
                self.ids.append(call_id())
                self.arguments_sent.append(0)
                entry = {"index": index, "id": self.ids[index], "type": "function",
                         "function": {"name": call.name, "arguments": ""}}
                deltas.append(entry)
            more = call.arguments[self.arguments_sent[index]:]
            if more:
                self.arguments_sent[index] = len(call.arguments)
                if entry is None:
                    deltas.append({"index": index, "function": {"arguments": more}})
                else:
                    entry["function"]["arguments"] = more
        return new_content, deltas
