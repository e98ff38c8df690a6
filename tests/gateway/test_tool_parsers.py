"""Tool-call parsers on text alone: Hermes (Qwen2.5/Qwen3) and Llama 3.1 JSON, the forced choices' JSON, the
template detection, and the streaming diff: however the text is cut into deltas, the deltas add up to the
non-streamed message, and text that may begin a call marker is held back until it is known."""

from __future__ import annotations

import json
import random

import pytest

from gateway.tool_calls import ToolCalls, split
from gateway.tool_parsers import PARSER_NAMES, detect, model_parser
from gateway.tool_parsers.forced import NamedFunctionParser, RequiredCallsParser
from gateway.tool_parsers.hermes import HermesParser
from gateway.tool_parsers.json_scan import scan_object, value_end
from gateway.tool_parsers.llama3_json import Llama3JsonParser
from tests.gateway.tool_helpers import pieces_of, streamed, whole

HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], '
          '"note": "a } and a \\" inside"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
          '</tool_call>')
LLAMA = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", "parameters": {}}'
CASES = [  # (parser, text, content, [(name, arguments)])
    (HermesParser(), HERMES, "Let me check.", [
        ("get_weather", '{"city": "Paris", "days": [1, 2], "note": "a } and a \\" inside"}'), ("get_time", "{}")]),
    (HermesParser(), "<tool_call>\n{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}\n</tool_call>", None,
     [("f", '{"a": 1}')]),  # arguments written as a JSON string
    (HermesParser(), '<tool_call>{"name": "f"}</tool_call>', None, [("f", "{}")]),  # no arguments at all
    (HermesParser(), '<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>', None, [("f", '{"x": 1}')]),
    (HermesParser(), "Plain text, a < sign and <tool_ but no call.", "Plain text, a < sign and <tool_ but no call.",
     []),
    (HermesParser(), 'broken <tool_call>{"nam": 1}</tool_call>', 'broken <tool_call>{"nam": 1}</tool_call>', []),
    (Llama3JsonParser(), LLAMA, None, [("get_weather", '{"city": "Rome"}'), ("get_time", "{}")]),
    (Llama3JsonParser(), '{"name": "f", "parameters": {"q": "x"}}', None, [("f", '{"q": "x"}')]),  # no tag
    (Llama3JsonParser(), 'Sure: {"a": 1} is JSON. {"name": "f", "arguments": {"b": "}"}}', "Sure: {\"a\": 1} is JSON.",
     [("f", '{"b": "}"}')]),
    (Llama3JsonParser(), "No call {here}.", "No call {here}.", []),
    (RequiredCallsParser(), '[{"name":"get_weather","arguments":{"city":"Paris"}},{"name":"get_time","arguments":{}}]',
     None, [("get_weather", '{"city":"Paris"}'), ("get_time", "{}")]),
    (NamedFunctionParser("get_time"), '{"name":"get_time","arguments":{"zone":"UTC"}}', None,
     [("get_time", '{"zone":"UTC"}')]),
]


def _expected(calls):
    return [{"name": n, "arguments": a} for n, a in calls]


@pytest.mark.parametrize("parser, text, content, calls", CASES, ids=lambda v: getattr(v, "name", None))
def test_whole_text(parser, text, content, calls):
    got_content, got_calls, finish = whole(ToolCalls(parser), text)
    assert got_content == content
    assert got_calls == _expected(calls)
    assert finish == ("tool_calls" if calls else "stop")
    for call in got_calls:
        json.loads(call["arguments"])


@pytest.mark.parametrize("parser, text, content, calls", CASES, ids=lambda v: getattr(v, "name", None))
def test_any_split_streams_the_same(parser, text, content, calls):
    tools = ToolCalls(parser)
    want_content, want_calls, _ = whole(tools, text)
    rng = random.Random(0)
    randomly = [rng.sample(range(len(text)), min(k, len(text))) for k in (2, 5, 17) for _ in range(5)]
    splits = [[], list(range(len(text))), *randomly]  # whole, one character a delta, random cuts
    for cuts in splits:
        got_content, got_calls, called = streamed(tools, pieces_of(text, cuts))
        assert (got_content or None) == (want_content or None), cuts
        assert got_calls == want_calls, cuts
        assert called == bool(want_calls)


def test_a_marker_split_over_deltas_is_held_back():
    stream = ToolCalls(HermesParser()).stream()
    assert stream.feed("Hi <tool", False) == ("Hi", [])  # maybe a call: held
    assert stream.feed("_c", False) == ("", [])
    content, deltas = stream.feed('all>{"name": "f", "argu', False)
    assert content == "" and deltas == [{"index": 0, "id": deltas[0]["id"], "type": "function",
                                         "function": {"name": "f", "arguments": ""}}]
    assert stream.feed('ments": {"a"', False)[1] == [{"index": 0, "function": {"arguments": '{"a"'}}]
    assert stream.feed(": 1}}</tool_call>", True)[1] == [{"index": 0, "function": {"arguments": ": 1}"}}]


def test_held_text_that_is_no_marker_comes_out():
    stream = ToolCalls(HermesParser()).stream()
    assert stream.feed("a <tool", False) == ("a", [])
    assert stream.feed("box> b ", False) == (" <toolbox> b", [])
    assert stream.feed("", True) == (" ", [])  # the end: trailing whitespace too
    stream = ToolCalls(Llama3JsonParser()).stream()
    assert stream.feed('x {"na', False) == ("x", [])
    assert stream.feed('ve": 1}', True) == (' {"nave": 1}', [])


def test_parallel_tool_calls_false_keeps_the_first():
    assert whole(ToolCalls(HermesParser(), max_calls=1), HERMES)[1] == [
        {"name": "get_weather", "arguments": '{"city": "Paris", "days": [1, 2], "note": "a } and a \\" inside"}'}]
    assert [c["name"] for c in streamed(ToolCalls(HermesParser(), 1), list(HERMES))[1]] == ["get_weather"]


def test_a_call_cut_by_length_says_length():
    text = '<tool_call>{"name": "f", "arguments": {"a": [1, 2'
    content, calls, finish = whole(ToolCalls(HermesParser()), text, "length")
    assert content is None and calls == [{"name": "f", "arguments": '{"a": [1, 2'}] and finish == "length"
    assert streamed(ToolCalls(HermesParser()), list(text))[1] == calls


def test_required_output_that_is_not_calls_is_content():
    assert whole(ToolCalls(RequiredCallsParser()), "oops") == ("oops", [], "stop")
    assert split(RequiredCallsParser(), "[", False) == ("", [])


def test_json_scan():
    s = '{"a": "x\\"}", "b": [1, {"c": 2}], "n": 12'
    scan = scan_object(s, 0)
    assert [(m.key, s[m.start:m.end] if m.end else None) for m in scan.members] == [
        ("a", '"x\\"}"'), ("b", '[1, {"c": 2}]'), ("n", None)]  # a number at the end may go on
    assert scan.end is None and not scan.broken
    assert scan_object('{"a" 1}', 0).broken
    assert scan_object('{"\\q": 1}', 0).broken  # a bad escape in a key
    assert value_end('"abc', 0) is None and value_end("[1, [2]] x", 0) == 8


@pytest.mark.parametrize("template, name", [
    ("{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>", "hermes"),
    ('{{- "<|python_tag|>" }}{"name": ..., "parameters": ...} {% if tools %}', "llama3_json"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "none"),
    (None, "none"),
    ({"default": "plain", "tool_use": "<tool_call>"}, "hermes"),
])
def test_detect(template, name):
    assert detect(template) == name
    parser = model_parser("auto", template)
    assert (parser.name if parser else "none") == name


def test_parser_names():
    assert PARSER_NAMES == ("auto", "none", "hermes", "llama3_json")
    assert model_parser("none", "<tool_call>") is None
    assert model_parser("hermes", None).name == "hermes"
    with pytest.raises(ValueError, match="tool_call_parser"):
        model_parser("mistral", None)
