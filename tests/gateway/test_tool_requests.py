"""The request side, without a server: tools and tool_choice checked (400s naming `tools` / `tool_choice`), the
schemas a forced tool_choice compiles to, response_format and vLLM's fields as StructuredOutputsParams (400s
naming the field that was sent), and tool-call histories as the chat template takes them."""

from __future__ import annotations

import jsonschema
import msgspec
import pytest

from engine.sampling_params import StructuredOutputsParams
from gateway.errors import APIError
from gateway.limits import ServerLimits
from gateway.params import chat_messages, chat_param, chat_params, completion_param, completion_params
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.structured import requested_outputs
from gateway.tools import required_schema, tool_plan
from tests.gateway.tool_helpers import TIME, TOOLS

HI = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return msgspec.convert({"model": "m", "messages": HI, **fields}, ChatCompletionRequest)


def refused(param: str, make, *args):
    with pytest.raises(APIError) as info:
        make(*args)
    assert info.value.status == 400 and info.value.param == param, (info.value.param, info.value.message)
    return info.value.message


def plan(**fields):
    req = chat(**fields)
    return tool_plan(req.tools, req.tool_choice, req.parallel_tool_calls)


# -- tools and tool_choice -------------------------------------------------------------------------------------------

def _tool(**function):
    return {"type": "function", "function": {"name": "f", **function}}


@pytest.mark.parametrize("tools", [
    {"type": "function"}, [], ["f"], [{"type": "custom", "custom": {"name": "f"}}], [{"type": "function"}],
    [_tool(name="has space")], [_tool(name="x" * 65)], [_tool(name="")], [_tool(), _tool()],
    [_tool(parameters={"type": "objekt"})], [_tool(parameters={"properties": {"a": {"type": 5}}})],
    [_tool(parameters="{}")], [_tool(description=3)], [_tool(strict="yes")],
], ids=repr)
def test_bad_tools(tools):
    refused("tools", lambda: plan(tools=tools))


@pytest.mark.parametrize("choice, tools", [
    ("sometimes", TOOLS), (3, TOOLS), ({"type": "function", "function": {"name": "nope"}}, TOOLS),
    ({"type": "function"}, TOOLS), ({"type": "function", "function": "get_time"}, TOOLS),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}, TOOLS),
    ("required", None), ("auto", None), ({"type": "function", "function": {"name": "get_time"}}, None),
], ids=repr)
def test_bad_tool_choice(choice, tools):
    message = refused("tool_choice", lambda: plan(tools=tools, tool_choice=choice))
    if isinstance(choice, dict) and choice.get("function", {}) == {"name": "nope"}:
        assert "'nope'" in message


def test_tool_choice_defaults_and_modes():
    assert (plan().choice, plan(tools=TOOLS).choice, plan(tool_choice="none").choice) == ("none", "auto", "none")
    named = plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert (named.choice, named.function, named.forced) == ("named", "get_time", True)
    call = named.structured_outputs().json  # one call object, its name fixed
    assert call["properties"] == {"name": {"type": "string", "enum": ["get_time"]},
                                  "arguments": TIME["function"]["parameters"]}
    assert jsonschema.Draft202012Validator(call).is_valid({"name": "get_time", "arguments": {"zone": "UTC"}})
    assert not jsonschema.Draft202012Validator(call).is_valid({"name": "get_weather", "arguments": {"zone": "UTC"}})
    assert plan(tools=TOOLS).structured_outputs() is None and not plan(tools=TOOLS).forced
    # the tools go to the chat template, tool_choice none too (vLLM's default), beside the request's own kwargs
    assert plan(tools=TOOLS, tool_choice="none").template_kwargs({"x": 1}) == {"x": 1, "tools": TOOLS}
    assert plan().template_kwargs(None) is None


def test_a_function_without_parameters_takes_an_empty_object():
    p = plan(tools=[{"type": "function", "function": {"name": "ping"}}],
             tool_choice={"type": "function", "function": {"name": "ping"}})
    assert p.structured_outputs().json["properties"]["arguments"] == {"type": "object", "properties": {}}
    assert plan(tools=[_tool(parameters={"properties": {"a": {}}})], tool_choice="required").structured_outputs(
    ).json["items"]["anyOf"][0]["properties"]["arguments"] == {"type": "object", "properties": {"a": {}}}


def test_required_schema_takes_calls_of_the_tools_only():
    schema = plan(tools=TOOLS, tool_choice="required").structured_outputs().json
    check = jsonschema.Draft202012Validator(schema)
    assert check.is_valid([{"name": "get_weather", "arguments": {"city": "Paris", "metric": True}},
                           {"name": "get_time", "arguments": {"zone": "UTC"}}])
    for bad in ([], [{"name": "get_time", "arguments": {"zone": "Mars"}}], [{"name": "other", "arguments": {}}],
                [{"name": "get_time"}], [{"name": "get_time", "arguments": {"zone": "UTC"}, "extra": 1}]):
        assert not check.is_valid(bad), bad
    single = plan(tools=TOOLS, tool_choice="required", parallel_tool_calls=False).structured_outputs().json
    assert single["maxItems"] == 1 and "maxItems" not in schema


def test_required_schema_moves_definitions_to_the_root():
    with_defs = _tool(parameters={"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}},
                                  "$defs": {"P": {"type": "integer"}}})
    other = {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"q": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}}}
    schema = required_schema([with_defs, other], True)
    assert schema["$defs"] == {"P": {"type": "integer"}}
    check = jsonschema.Draft202012Validator(schema)
    assert check.is_valid([{"name": "f", "arguments": {"p": 3}}])
    assert not check.is_valid([{"name": "f", "arguments": {"p": "x"}}])
    assert "$defs" in with_defs["function"]["parameters"]  # the request's own tools are left as they were
    clash = {"type": "function", "function": {"name": "h", "parameters": {
        "type": "object", "properties": {}, "$defs": {"P": {"type": "string"}}}}}
    refused("tools", required_schema, [with_defs, clash], True)


# -- response_format and vLLM's fields --------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("fields, expected", [
    ({}, None), ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a-b_1", "schema": SCHEMA, "strict": True,
                                                                   "description": "d"}}},
     StructuredOutputsParams(json=SCHEMA)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
     StructuredOutputsParams(json_object=True)),
    ({"structured_outputs": {"regex": "[ab]+"}}, StructuredOutputsParams(regex="[ab]+")),
    ({"structured_outputs": {"choice": ["yes", "no"], "json_object": False}},
     StructuredOutputsParams(choice=["yes", "no"])),
    ({"structured_outputs": {"json": SCHEMA}}, StructuredOutputsParams(json=SCHEMA)),
    ({"guided_json": '{"type": "object"}'}, StructuredOutputsParams(json={"type": "object"})),
    ({"guided_regex": "a|b"}, StructuredOutputsParams(regex="a|b")),
    ({"guided_choice": ["x"]}, StructuredOutputsParams(choice=["x"])),
    ({"guided_grammar": 'start: "a"'}, StructuredOutputsParams(grammar='start: "a"')),
], ids=repr)
def test_structured_outputs_of_a_request(fields, expected):
    assert requested_outputs(chat(**fields)) == expected
    assert chat_params(chat(**fields), ServerLimits()).structured_outputs == expected
    completion = msgspec.convert({"model": "m", "prompt": "p", **fields}, CompletionRequest)
    assert completion_params(completion, ServerLimits()).structured_outputs == expected


@pytest.mark.parametrize("fields, param", [
    ({"response_format": "json"}, "response_format"), ({"response_format": {}}, "response_format"),
    ({"response_format": {"type": "json"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": "x"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": SCHEMA}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": [1]}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "objekt"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "strict": "yes"}}}, "response_format"),
    ({"structured_outputs": "json"}, "structured_outputs"), ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
    ({"structured_outputs": {"json": {"type": 5}}}, "structured_outputs"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"), ({"guided_json": "[1]"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"), ({"guided_regex": ""}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
], ids=repr)
def test_bad_structured_outputs(fields, param):
    refused(param, requested_outputs, chat(**fields))


def test_engine_errors_name_the_field_that_was_sent():
    """The engine refuses what it cannot compile as `structured_outputs`: the request's own field is named."""
    for fields, param in [({"response_format": {"type": "json_object"}}, "response_format"),
                          ({"guided_grammar": "x"}, "guided_grammar"), ({"structured_outputs": {"regex": "("}},
                                                                         "structured_outputs"),
                          ({"tools": TOOLS, "tool_choice": "required"}, "tools"),
                          ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}},
                            "response_format": {"type": "json_object"}}, "tools")]:
        assert chat_param(chat(**fields), "structured_outputs") == param
    completion = msgspec.convert({"model": "m", "prompt": "p", "guided_regex": "("}, CompletionRequest)
    assert completion_param(completion, "structured_outputs") == "guided_regex"
    assert completion_param(completion, "max_tokens") == "max_tokens"


def test_json_output_is_never_read_for_calls():
    from gateway.tool_parsers.llama3_json import Llama3JsonParser

    auto, parser = plan(tools=TOOLS), Llama3JsonParser()
    assert auto.output(parser).parser is parser
    assert auto.output(parser, StructuredOutputsParams(json_object=True)) is None
    assert auto.output(parser, StructuredOutputsParams(json={"type": "object"})) is None
    assert auto.output(parser, StructuredOutputsParams(regex="x")).parser is parser  # may spell a call out
    assert plan(tools=TOOLS, tool_choice="none").output(parser) is None
    assert auto.output(None) is None


def test_a_forced_tool_choice_wins_over_response_format():
    req = chat(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    params = chat_params(req, ServerLimits(), tool_plan(req.tools, req.tool_choice, None))
    assert params.structured_outputs.json["type"] == "array"
    req = chat(tools=TOOLS, response_format={"type": "json_object"})  # auto: the text's format applies
    params = chat_params(req, ServerLimits(), tool_plan(req.tools, req.tool_choice, None))
    assert params.structured_outputs == StructuredOutputsParams(json_object=True)


# -- tool-call histories ----------------------------------------------------------------------------------------------

def test_history_with_tool_calls_and_results():
    messages = [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "noon"}]}]
    assert chat_messages(chat(messages=messages))[1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        {"role": "tool", "content": "noon", "tool_call_id": "call_2"}]


@pytest.mark.parametrize("message, param", [
    ({"role": "tool", "content": "x"}, "messages[1].tool_call_id"),
    ({"role": "tool", "tool_call_id": "c"}, "messages[1].content"),
    ({"role": "user", "content": "x", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]},
     "messages[1].tool_calls"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]},
     "messages[1].tool_calls[0].function.arguments"),
], ids=repr)
def test_bad_history(message, param):
    refused(param, chat_messages, chat(messages=[*HI, message]))
