"""The request side of tool calls: `tools` and `tool_choice` checked, the tools the chat template renders, the
JSON schema a forced tool_choice holds the output to, and the parser that reads calls back out of the text.

Forced choices are enforced with structured output, so their calls always parse: `required` is a JSON array
of calls, each `{"name", "arguments"}` object's name one of the tools' and its arguments that tool's parameters
(vLLM does the same); a named function is one such object, its name fixed. The model writes the name before the
arguments: a model whose template cannot show it the tools (or a small one) then still knows what it calls."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from engine.sampling_params import StructuredOutputsParams
from gateway.errors import bad_request
from gateway.structured import NAME, check_schema
from gateway.tool_calls import ToolCalls
from gateway.tool_parsers.base import ToolParser
from gateway.tool_parsers.forced import NamedFunctionParser, RequiredCallsParser

_CHOICES = ("none", "auto", "required")
_COMBINATORS = ("type", "$ref", "anyOf", "oneOf", "allOf", "enum", "const")
_KIND_NAMES = {str: "string", bool: "boolean", dict: "JSON schema object"}


@dataclass
class ToolPlan:
    tools: list[dict] = field(default_factory=list)  # as given, checked: what the chat template renders
    choice: str = "none"  # none | auto | required | named
    function: str | None = None  # the named function
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    def template_kwargs(self, kwargs: dict | None) -> dict | None:
        """The chat template's keyword arguments with the tools (rendered with tool_choice none too, as vLLM
        does by default: the model still reads what the conversation's earlier calls were)."""
        return {**(kwargs or {}), "tools": self.tools} if self.tools else kwargs

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.choice == "named":
            return StructuredOutputsParams(json=call_schema(self._tool(self.function)))
        if self.choice == "required":
            return StructuredOutputsParams(json=required_schema(self.tools, self.parallel))
        return None

    def output(self, model_parser: ToolParser | None,
               structured: StructuredOutputsParams | None = None) -> ToolCalls | None:
        """How the text becomes calls: a forced choice's own JSON, else (auto) the model's format, if known.
        Text held to JSON by response_format is the answer itself, never read for calls (Llama's format would
        take any object with a "name"); a regex or grammar may spell calls out, so theirs are read."""
        most = None if self.parallel else 1
        if self.choice == "named":
            return ToolCalls(NamedFunctionParser(self.function))
        if self.choice == "required":
            return ToolCalls(RequiredCallsParser(), most)
        json_text = structured is not None and (structured.json is not None or structured.json_object)
        if self.choice == "auto" and model_parser is not None and not json_text:
            return ToolCalls(model_parser, most)
        return None

    def _tool(self, name: str) -> dict:
        return next(t for t in self.tools if t["function"]["name"] == name)


def tool_plan(tools, tool_choice, parallel_tool_calls: bool | None) -> ToolPlan:
    checked = check_tools(tools)
    choice, function = _choice(tool_choice, checked)
    return ToolPlan(checked, choice, function, parallel_tool_calls is not False)


def check_tools(tools) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list) or not tools:
        raise bad_request("tools must be a non-empty array of tools", "tools")
    names = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(f"tools[{i}]: only tools of type function are supported", "tools")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad_request(f"tools[{i}] needs a function object", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise bad_request(f"tools[{i}].function.name must be 1 to 64 letters, digits, underscores or dashes, "
                              f"got {name!r}", "tools")
        if name in names:
            raise bad_request(f"tools[{i}]: a second function named {name!r}", "tools")
        names.add(name)
        for key, kind in (("description", str), ("strict", bool), ("parameters", dict)):
            if function.get(key) is not None and not isinstance(function[key], kind):
                raise bad_request(f"tools[{i}].function.{key} must be a {_KIND_NAMES[kind]}", "tools")
        if function.get("parameters") is not None:
            check_schema(function["parameters"], "tools")
    return tools


def _choice(tool_choice, tools: list[dict]) -> tuple[str, str | None]:
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(tool_choice, str) and tool_choice in _CHOICES:
        choice, function = tool_choice, None
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        spec = tool_choice.get("function")
        function = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(function, str):
            raise bad_request("tool_choice of type function needs function.name", "tool_choice")
        choice = "named"
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("type"), str):
        raise bad_request(f"tool_choice of type {tool_choice['type']!r} is not supported: give none, auto, "
                          f"required or a function", "tool_choice")
    else:
        raise bad_request("tool_choice must be none, auto, required or {'type': 'function', 'function': "
                          "{'name': ...}}", "tool_choice")
    if choice != "none" and not tools:
        raise bad_request(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
    if choice == "named" and function not in {t["function"]["name"] for t in tools}:
        raise bad_request(f"tool_choice names function {function!r}, which is not among the tools", "tool_choice")
    return choice, function


def parameters(tool: dict) -> dict:
    """A function's parameter schema, an object schema whatever was given (none: no parameters)."""
    schema = tool["function"].get("parameters")
    if schema is None:
        return {"type": "object", "properties": {}}
    if not any(key in schema for key in _COMBINATORS):
        return {"type": "object", **schema}
    return schema


def call_schema(tool: dict, arguments: dict | None = None) -> dict:
    """`{"name": <the tool's name>, "arguments": <its parameters>}`."""
    return {"type": "object", "properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]},
                                             "arguments": parameters(tool) if arguments is None else arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """`[{"name": <a tool's>, "arguments": <its parameters>}, ...]`, one call at least (at most one unless
    parallel). Each tool's definitions ($defs, definitions) move to the root, where its `#/...` references
    now point."""
    roots: dict[str, dict] = {}
    calls = []
    for tool in tools:
        schema = copy.deepcopy(parameters(tool))
        for key in ("$defs", "definitions"):
            definitions = schema.pop(key, None) or {}
            if not isinstance(definitions, dict):  # an older draft's metaschema lets $defs be anything
                raise bad_request(f"tools: {tool['function']['name']}'s {key} must be an object", "tools")
            for name, definition in definitions.items():
                if roots.setdefault(key, {}).setdefault(name, definition) != definition:
                    raise bad_request(f"tools: two tools define {key}/{name} differently; tool_choice "
                                      f"{'required'!r} puts their schemas into one", "tools")
        calls.append(call_schema(tool, schema))
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **roots}
    if not parallel:
        schema["maxItems"] = 1
    return schema
