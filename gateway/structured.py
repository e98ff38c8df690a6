"""What a request asks its output to match: OpenAI's `response_format` and vLLM's fields (`structured_outputs`,
and the older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`), as the engine's
StructuredOutputsParams. Malformed ones are a 400 naming the field; the engine compiles the grammar and refuses
one it cannot compile (param `structured_outputs`, which `output_field` names back)."""

from __future__ import annotations

import json
import re

from engine.errors import InvalidRequestError
from engine.sampling_params import StructuredOutputsParams
from gateway.errors import bad_request

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for response format and function names
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_VLLM_KEYS = ("json", "json_object", "regex", "choice", "grammar")


def requested_outputs(req) -> StructuredOutputsParams | None:
    """The request's own structured output (not a forced tool_choice's); at most one field may ask."""
    given = []
    if (spec := response_format(req.response_format)) is not None:
        given.append(("response_format", spec))
    if req.structured_outputs is not None:
        given.append(("structured_outputs", _vllm_object(req.structured_outputs)))
    for field, key in _GUIDED.items():
        value = getattr(req, field)
        if value is not None:
            if key == "json":
                value = json_schema(value, field, text=True)
            given.append((field, _spec(field, **{key: value})))
    if len(given) > 1:
        raise bad_request(f"give one of {', '.join(f for f, _ in given)}: each sets what the output must match",
                          given[1][0])
    return given[0][1] if given else None


def output_field(req) -> str:
    """The request field that set the structured output: the name an engine error about it should carry."""
    if getattr(req, "tool_choice", None) == "required" or isinstance(getattr(req, "tool_choice", None), dict):
        return "tools"  # the grammar came from the tools' parameter schemas
    if req.response_format is not None and not (isinstance(req.response_format, dict)
                                                and req.response_format.get("type") == "text"):
        return "response_format"
    return next((f for f in ("structured_outputs", *_GUIDED) if getattr(req, f) is not None), "structured_outputs")


def response_format(value) -> StructuredOutputsParams | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad_request("response_format must be an object with a type: text, json_object or json_schema",
                          "response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise bad_request(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                          "response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("response_format of type json_schema needs a json_schema object", "response_format")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise bad_request(f"response_format.json_schema.name must be 1 to 64 letters, digits, underscores or "
                          f"dashes, got {name!r}", "response_format")
    for key, kinds in (("strict", (bool,)), ("description", (str,))):
        if spec.get(key) is not None and not isinstance(spec[key], kinds):
            raise bad_request(f"response_format.json_schema.{key} must be a {kinds[0].__name__}", "response_format")
    if spec.get("schema") is None:  # OpenAI's schema is optional: then any JSON object
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=json_schema(spec["schema"], "response_format"))


def json_schema(value, param: str, text: bool = False) -> dict:
    """A JSON schema given as an object (or, with text, as vLLM's fields take it: its JSON text), checked
    against its metaschema."""
    if text and isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise bad_request(f"{param}: the schema is not valid JSON: {exc}", param) from None
    if not isinstance(value, dict):
        raise bad_request(f"{param}: a JSON schema must be an object, got {type(value).__name__}", param)
    check_schema(value, param)
    return value


def check_schema(schema: dict, param: str) -> None:
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise bad_request(f"{param}: not a valid JSON schema{f' at {where}' if where else ''}: {exc.message}",
                          param) from None
    except Exception as exc:  # what the checker itself trips on (a $schema that is no URI, nesting too deep)
        raise bad_request(f"{param}: not a valid JSON schema: {type(exc).__name__}: {exc}", param) from None


def _vllm_object(value) -> StructuredOutputsParams:
    if not isinstance(value, dict):
        raise bad_request("structured_outputs must be an object with one of json, json_object, regex, choice, "
                          "grammar", "structured_outputs")
    unknown = sorted(set(value) - set(_VLLM_KEYS))
    if unknown:
        raise bad_request(f"structured_outputs.{unknown[0]} is not supported (supported: {', '.join(_VLLM_KEYS)})",
                          "structured_outputs")
    given = {k: v for k, v in value.items() if v is not None and v is not False}
    if "json" in given:
        given["json"] = json_schema(given["json"], "structured_outputs", text=True)
    if "json_object" in given and given["json_object"] is not True:
        raise bad_request("structured_outputs.json_object must be a boolean", "structured_outputs")
    return _spec("structured_outputs", **given)


def _spec(field: str, **kwargs) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kwargs)
    except InvalidRequestError as exc:  # its message names structured_outputs' own keys
        raise bad_request(str(exc), field) from None
