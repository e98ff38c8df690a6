"""A scanner of JSON that may still be arriving: where each member of an object starts and, once complete,
ends, so a tool call's name and arguments can be read from any prefix of the model's text.

Arguments are kept as the model spelled them (a slice of the text, never re-encoded): the fragments a stream
sends then add up to exactly what the whole response carries. Structure only (brackets, strings, escapes);
what must be valid JSON (a name) is decoded with json.loads once complete."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_WS = " \t\n\r"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|"|[{}\[\]]', re.DOTALL)  # a whole string, an unterminated one, a bracket
_SCALAR = re.compile(r"[-+.\w]+")  # numbers, true, false, null (checked later, if ever)


@dataclass
class Member:
    key: str
    start: int
    end: int | None  # None: the value has not ended yet


@dataclass
class ObjectScan:
    members: list[Member]
    end: int | None  # one past the closing brace; None while open or where it broke
    broken: bool = False  # something no JSON object can continue with: nothing more will be read


def skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def value_end(s: str, i: int) -> int | None:
    """One past the end of the JSON value starting at s[i]; None if s ends inside it. ValueError if no value
    starts there."""
    c = s[i]
    if c == '"':
        m = _STRING.match(s, i)
        return m.end() if m else None
    if c in "{[":
        depth = 0
        for m in _TOKEN.finditer(s, i):
            token = m.group()
            if token == '"':
                return None  # a string still open
            if token in "{[":
                depth += 1
            elif token in "}]":
                depth -= 1
                if depth == 0:
                    return m.end()
        return None
    m = _SCALAR.match(s, i)
    if not m:
        raise ValueError(f"no JSON value at {s[i:i + 10]!r}")
    return m.end() if m.end() < len(s) else None  # a number may go on


def scan_object(s: str, i: int) -> ObjectScan:
    """The members of the object whose `{` is at s[i], as far as s goes."""
    members: list[Member] = []
    j = skip_ws(s, i + 1)
    if j < len(s) and s[j] == "}":
        return ObjectScan(members, j + 1)
    while j < len(s):
        if s[j] != '"':
            return ObjectScan(members, None, broken=True)
        key_end = value_end(s, j)
        if key_end is None:
            return ObjectScan(members, None)
        try:
            key = json.loads(s[j:key_end])
        except ValueError:  # a bad escape: the model's text is not JSON here
            return ObjectScan(members, None, broken=True)
        j = skip_ws(s, key_end)
        if j < len(s) and s[j] != ":":
            return ObjectScan(members, None, broken=True)
        j = skip_ws(s, j + 1)
        if j >= len(s):
            return ObjectScan(members, None)
        try:
            end = value_end(s, j)
        except ValueError:
            return ObjectScan(members, None, broken=True)
        members.append(Member(key, j, end))
        if end is None:
            return ObjectScan(members, None)
        j = skip_ws(s, end)
        if j >= len(s):
            break
        if s[j] == "}":
            return ObjectScan(members, j + 1)
        if s[j] != ",":
            return ObjectScan(members, None, broken=True)
        j = skip_ws(s, j + 1)
    return ObjectScan(members, None)


def string_value(s: str, member: Member) -> str | None:
    """A complete member's value if it is a non-empty string."""
    if member.end is None:
        return None
    try:
        value = json.loads(s[member.start:member.end])
    except ValueError:
        return None
    return value if isinstance(value, str) and value else None


def raw_arguments(s: str, member: Member) -> str:
    """The arguments as the model wrote them, as far as they go. An object grows as it arrives; arguments
    written as a JSON string (some models quote them) are unquoted once complete, and show nothing before."""
    if member.end is None:
        return s[member.start:] if s[member.start] in "{[" else ""
    raw = s[member.start:member.end]
    if raw.startswith('"'):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw
