"""Real clients that call tools, against `kvgate serve` on the embedded default model (SmolLM2-135M-Instruct,
whose chat template knows no tool format: the calls are forced with tool_choice, and structured output makes
them well formed): LangChain's ChatOpenAI(...).bind_tools(...) in an agent loop of two tool rounds and a final
answer (one round streamed), and the OpenAI Agents SDK through its chat-completions model, run and streamed."""

from __future__ import annotations

import asyncio
from typing import Literal

import pytest

from tests.server import running_server

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deadline")]

CALLED: list[tuple[str, dict]] = []


def get_weather(city: Literal["Paris", "Rome"]) -> str:
    """The weather in a city."""
    CALLED.append(("get_weather", {"city": city}))
    return f"It is sunny in {city}."


def get_time(zone: Literal["UTC", "CET"]) -> str:
    """The time in a time zone."""
    CALLED.append(("get_time", {"zone": zone}))
    return f"It is noon {zone}."


@pytest.fixture(scope="module")
def default_server():
    with running_server(None, "--max-model-len", "2048") as server:
        yield server


def test_langchain_agent_loop(default_server):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    tools = {t.name: t for t in (tool(get_weather), tool(get_time))}
    llm = ChatOpenAI(base_url=default_server.base_url, api_key="x", model=default_server.model, temperature=0,
                     max_tokens=64, max_retries=0)
    messages = [HumanMessage("What is the weather in Paris, and what time is it in CET?")]
    rounds = [("any", False), ("get_time", True)]  # tool_choice required, then a named function (streamed)
    CALLED.clear()
    for choice, stream in rounds:
        bound = llm.bind_tools(list(tools.values()), tool_choice=choice)
        if stream:
            reply = None
            for chunk in bound.stream(messages):
                reply = chunk if reply is None else reply + chunk
        else:
            reply = bound.invoke(messages)
        assert reply.tool_calls, reply
        messages.append(reply)
        for call in reply.tool_calls:
            assert call["id"].startswith("call_") and call["name"] in tools
            messages.append(ToolMessage(tools[call["name"]].invoke(call["args"]), tool_call_id=call["id"]))
    assert [name for name, _ in CALLED][-1] == "get_time" and len(CALLED) >= 2
    final = llm.invoke(messages)  # no tools bound: a text answer over the whole conversation
    # (what it says is the small model's: its template shows the calls as empty turns, so it may say nothing)
    assert isinstance(final, AIMessage) and isinstance(final.content, str) and not final.tool_calls
    assert final.response_metadata["finish_reason"] in ("stop", "length")


def test_openai_agents_sdk(default_server):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from agents.items import ToolCallItem, ToolCallOutputItem
    from openai import AsyncOpenAI

    set_tracing_disabled(True)

    async def main():
        client = AsyncOpenAI(base_url=default_server.base_url, api_key="x", max_retries=0)
        model = OpenAIChatCompletionsModel(model=default_server.model, openai_client=client)
        # the first turn must call get_weather; reset_tool_choice (the default) lets the next one answer
        agent = Agent(name="weather", instructions="Answer with the weather.", tools=[function_tool(get_weather)],
                      model=model, model_settings=ModelSettings(tool_choice="get_weather", temperature=0,
                                                                max_tokens=64))
        ran = await Runner.run(agent, "What is the weather in Rome?", max_turns=4)
        streamed = Runner.run_streamed(agent, "What is the weather in Paris?", max_turns=4)
        async for _ in streamed.stream_events():
            pass
        await client.close()
        return ran, streamed

    CALLED.clear()
    ran, streamed = asyncio.run(main())
    for result in (ran, streamed):
        calls = [item for item in result.new_items if isinstance(item, ToolCallItem)]
        outputs = [item for item in result.new_items if isinstance(item, ToolCallOutputItem)]
        assert calls and len(outputs) == len(calls)
        assert all(item.raw_item.name == "get_weather" for item in calls)
        assert isinstance(result.final_output, str)  # the turn after the call: text, not another call
    assert [name for name, _ in CALLED] == ["get_weather"] * len(CALLED) and len(CALLED) >= 2
