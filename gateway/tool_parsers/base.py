"""What a tool-call parser is: one model family's way of writing calls in its text, read from any prefix of it.

A parser only parses; gateway/tool_calls.py turns successive parses into a response or stream deltas."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.tool_parsers.json_scan import raw_arguments, scan_object, string_value


@dataclass
class Call:
    name: str | None  # None until the model has written it (such a call is not shown)
    arguments: str  # as far as written: it only ever grows
    done: bool = False


class ToolParser:
    name = ""

    def start(self, text: str) -> int | None:
        """Where the first call begins in text (the text before it is content), or None."""
        raise NotImplementedError

    def hold_from(self, text: str) -> int:
        """With no call begun: where a call may still begin, the text from there being a marker's beginning."""
        return len(text)

    def calls(self, region: str) -> list[Call]:
        """The calls in text[start:], the last one possibly unfinished."""
        raise NotImplementedError


def call_at(s: str, i: int, argument_keys: tuple[str, ...]) -> tuple[Call, int | None]:
    """The call written as the object whose `{` is at s[i], and where that object ends (None: not yet)."""
    scan = scan_object(s, i)
    name, arguments, has_arguments = None, "", False
    for member in scan.members:
        if member.key == "name":
            name = string_value(s, member)
        elif member.key in argument_keys:
            arguments, has_arguments = raw_arguments(s, member), True
    if scan.end is not None and not has_arguments:
        arguments = "{}"  # a call of a function without parameters may leave them out
    return Call(name, arguments, scan.end is not None), scan.end


def partial_marker_at(text: str, markers: tuple[str, ...]) -> int:
    """The first index from which the rest of text is a proper beginning of one of markers (else len(text))."""
    longest = max(len(m) for m in markers)
    for i in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[i:]
        if any(m.startswith(tail) for m in markers):
            return i
    return len(text)
