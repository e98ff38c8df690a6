"""Tool calls and structured output through the official `openai` SDK (strict response validation, sync and
async, streamed and not) against `kvgate serve` on the tiny random model. Its chat template knows no tool format
(so `auto` has no parser): the calls here are forced by tool_choice, which structured output makes well formed
whatever the weights. The stream helper's accumulated object equals the non-streamed one."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import jsonschema
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel

from tests.gateway.sdk_helpers import CHAT, GREEDY, _client
from tests.gateway.tool_helpers import ARGUMENT_SCHEMAS, TOOLS

pytestmark = pytest.mark.usefixtures("deadline")

NAMED = {"type": "function", "function": {"name": "get_time"}}
ASK = dict(messages=CHAT, tools=TOOLS, max_tokens=160)
WEATHER_FORMAT = {"type": "json_schema", "json_schema": {"name": "w", "schema": ARGUMENT_SCHEMAS["get_weather"]}}


def _check_calls(message, names=None, most: int | None = None, cut: bool = False):
    """Each call well formed: an id, a tool's name, arguments valid against its parameters (cut: max_tokens may
    have ended the last one)."""
    assert message.tool_calls, message
    assert message.content is None
    if most is not None:
        assert len(message.tool_calls) <= most
    for call in message.tool_calls[:-1] if cut else message.tool_calls:
        assert call.id.startswith("call_") and len(call.id) > 10 and call.type == "function"
        assert call.function.name in (names or ARGUMENT_SCHEMAS)
        jsonschema.validate(json.loads(call.function.arguments), ARGUMENT_SCHEMAS[call.function.name])
    assert len({c.id for c in message.tool_calls}) == len(message.tool_calls)


def _calls(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


@pytest.mark.parametrize("tool_choice, parallel", [("required", None), ("required", False), (NAMED, None)],
                         ids=["required", "required-one", "named"])
def test_forced_tool_calls(server, client, tool_choice, parallel):
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    r = client.chat.completions.create(model=server.model, tool_choice=tool_choice, temperature=1, seed=3, n=3,
                                       **ASK, **extra)
    assert len(r.choices) == 3
    for choice in r.choices:
        one = tool_choice is NAMED or parallel is False
        # random weights may go on adding calls to the array until max_tokens: then it says length
        assert choice.finish_reason == "tool_calls" or (not one and choice.finish_reason == "length"), choice
        _check_calls(choice.message, ["get_time"] if tool_choice is NAMED else None, 1 if one else None,
                     cut=choice.finish_reason == "length")


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_stream_helper_equals_the_whole_response(server, client, tool_choice):
    whole = client.chat.completions.create(model=server.model, tool_choice=tool_choice, **ASK, **GREEDY)
    with client.chat.completions.stream(model=server.model, tool_choice=tool_choice, **ASK, **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    [a], [b] = whole.choices, final.choices
    assert _calls(a.message) == _calls(b.message) and b.message.content is None
    assert a.finish_reason == b.finish_reason == "tool_calls"
    _check_calls(b.message)
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.name, e.arguments) for e in done] == _calls(a.message)


def test_stream_deltas_as_openai_sends_them(server, client):
    """Per call: id, type and name in its first delta, then arguments alone; every delta has its index; each of
    n choices streams its own calls; the last chunk of each says tool_calls."""
    stream = client.chat.completions.create(model=server.model, tool_choice="required", stream=True, n=2,
                                            temperature=1, seed=5, parallel_tool_calls=False, **ASK)
    calls: dict[int, dict[int, dict]] = {0: {}, 1: {}}
    finishes: dict[int, list] = {0: [], 1: []}
    for chunk in stream:
        for choice in chunk.choices:
            finishes[choice.index].append(choice.finish_reason)
            for d in choice.delta.tool_calls or []:
                mine = calls[choice.index]
                if d.index not in mine:
                    assert d.index == len(mine) and d.id.startswith("call_") and d.type == "function"
                    assert d.function.name in ARGUMENT_SCHEMAS
                    mine[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    assert d.id is None and d.type is None and d.function.name is None
                    mine[d.index]["arguments"] += d.function.arguments
    for index in (0, 1):
        assert finishes[index][-1] == "tool_calls" and set(finishes[index][:-1]) == {None}
        assert calls[index]
        for call in calls[index].values():
            jsonschema.validate(json.loads(call["arguments"]), ARGUMENT_SCHEMAS[call["name"]])


def test_async_client(server):
    async def main():
        async with _client(server, AsyncOpenAI) as client:
            whole = await client.chat.completions.create(model=server.model, tool_choice=NAMED, **ASK, **GREEDY)
            stream = await client.chat.completions.create(model=server.model, tool_choice=NAMED, stream=True,
                                                          **ASK, **GREEDY)
            arguments, names = "", []
            async for chunk in stream:
                for d in chunk.choices[0].delta.tool_calls or []:
                    names += [d.function.name] if d.function.name else []
                    arguments += d.function.arguments or ""
            return whole, names, arguments

    whole, names, arguments = asyncio.run(main())
    _check_calls(whole.choices[0].message, ["get_time"], 1)
    assert names == ["get_time"] and arguments == whole.choices[0].message.tool_calls[0].function.arguments


def test_a_conversation_with_tool_results(server, client):
    """A second round: the assistant's calls and the tools' results go back; the model may answer in text."""
    first = client.chat.completions.create(model=server.model, tool_choice="required", parallel_tool_calls=False,
                                           **ASK, **GREEDY).choices[0].message
    history = [*CHAT, first.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "sunny"} for c in first.tool_calls]
    r = client.chat.completions.create(model=server.model, messages=history, tools=TOOLS, tool_choice="none",
                                       max_tokens=8, **GREEDY)
    assert r.choices[0].message.tool_calls is None and isinstance(r.choices[0].message.content, str)


class Weather(BaseModel):
    city: Literal["Paris", "Rome"]
    metric: bool


def test_response_format_json_schema(server, client):
    r = client.chat.completions.parse(model=server.model, messages=CHAT, response_format=Weather, max_tokens=60,
                                      temperature=1, seed=2, n=4)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Weather), choice.message.content
    with client.chat.completions.stream(model=server.model, messages=CHAT, response_format=Weather, max_tokens=60,
                                        **GREEDY) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Weather)


def test_vllm_fields(server, client):
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=20, n=3, temperature=1,
                                       seed=1, extra_body={"guided_choice": ["yes", "no"]})
    assert {c.message.content for c in r.choices} <= {"yes", "no"}
    r = client.completions.create(model=server.model, prompt="Pick:", max_tokens=20, n=3, temperature=1, seed=1,
                                  extra_body={"structured_outputs": {"regex": "[ab]{3}"}})
    for choice in r.choices:
        assert len(choice.text) == 3 and set(choice.text) <= {"a", "b"} and choice.finish_reason == "stop"
    r = client.completions.create(model=server.model, prompt="JSON:", max_tokens=60, temperature=1, seed=1,
                                  extra_body={"response_format": WEATHER_FORMAT})
    Weather.model_validate_json(r.choices[0].text)
