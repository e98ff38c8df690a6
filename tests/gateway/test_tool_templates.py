"""Tools through the chat template and back, on the gateway's Service with an in-process engine: the tiny model
given a Hermes-style template (as Qwen's) that renders `tools`, earlier calls (their arguments as objects) and
tool results. `auto` reads the parser from that template. A model that writes its own format is stood in for by
structured output: a regex makes the random weights write a Hermes call (or a Llama 3.1 one), with tool_choice
auto, so the model's parser reads it; whole and streamed give the same message."""

from __future__ import annotations

import asyncio
import json
import shutil

import msgspec
import pytest

from engine.llm import AsyncLLM
from gateway.schemas import ChatCompletionRequest
from gateway.serving import Service
from tests.gateway.tool_helpers import TOOLS

pytestmark = pytest.mark.usefixtures("deadline")

HERMES_TEMPLATE = """
{%- if tools %}<|im_start|>system
# Tools
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{{ message.content }}{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "metric": true}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]
HERMES_CALL = (r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}'
               r'\n</tool_call>')
LLAMA_CALL = r'\{"name": "get_time", "parameters": \{"zone": "(UTC|CET)"\}\}'


@pytest.fixture(scope="module")
def hermes_model_dir(tiny_llama_dir, tmp_path_factory):
    target = tmp_path_factory.mktemp("hermes") / "model"
    shutil.copytree(tiny_llama_dir, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["chat_template"] = HERMES_TEMPLATE
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def _run(model_dir, work, **service_options):
    async def main():
        engine = AsyncLLM(str(model_dir), in_process=True, max_model_len=1024, num_kv_blocks=160)
        try:
            return await work(Service(engine, ["m"], **service_options))
        finally:
            engine.shutdown()

    return asyncio.run(main())


def _request(**fields) -> ChatCompletionRequest:
    return msgspec.convert({"model": "m", "messages": HISTORY, "tools": TOOLS, "max_tokens": 120, **fields},
                           ChatCompletionRequest)


def test_the_template_renders_tools_and_the_history(hermes_model_dir):
    async def work(service):
        assert service.tool_parser.name == "hermes"  # auto: the template writes <tool_call>
        return [service.chat_job(_request(tool_choice=c)).prompts[0].text for c in ("auto", "none")]

    auto, none = _run(hermes_model_dir, work)
    assert json.dumps(TOOLS[0]) in auto and json.dumps(TOOLS[1]) in auto
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "metric": true}}' in auto  # an object, not text
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in auto
    assert none == auto  # tool_choice none still shows the tools (vLLM's default)


async def _whole_and_streamed(service, req_fields):
    job = service.chat_job(_request(**req_fields))
    whole = await service.respond(job)
    job = service.chat_job(_request(stream=True, **req_fields))
    chunks = [json.loads(event[6:]) async for event in service.stream(job) if event.startswith(b"data: {")]
    return whole, chunks


def _accumulate(chunks) -> tuple[dict, str]:
    """The message a client builds from the deltas (the SDK's accumulation, by index), and the finish_reason."""
    message, finish = {"content": None, "tool_calls": []}, None
    for chunk in chunks:
        [choice] = chunk["choices"]
        delta, finish = choice["delta"], choice["finish_reason"] or finish
        if delta.get("content") is not None:
            message["content"] = (message["content"] or "") + delta["content"]
        for d in delta.get("tool_calls", []):
            if d["index"] == len(message["tool_calls"]):
                message["tool_calls"].append({"id": d["id"], "type": d["type"], "function": dict(d["function"])})
            else:
                message["tool_calls"][d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    return message, finish


@pytest.mark.parametrize("parser, regex, content, name", [
    ("auto", HERMES_CALL, "Checking.", "get_weather"), ("llama3_json", LLAMA_CALL, None, "get_time")])
def test_the_models_own_format_is_parsed(hermes_model_dir, parser, regex, content, name):
    fields = {"structured_outputs": {"regex": regex}, "temperature": 0}
    whole, chunks = _run(hermes_model_dir, lambda s: _whole_and_streamed(s, fields), tool_call_parser=parser)
    [choice] = whole["choices"]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and message["content"] == content
    [call] = message["tool_calls"]
    assert call["function"]["name"] == name and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) in ({"city": "Paris"}, {"city": "Rome"}, {"zone": "UTC"},
                                                         {"zone": "CET"})
    streamed, finish = _accumulate(chunks)
    assert finish == "tool_calls" and streamed["content"] == content
    assert [c["function"] for c in streamed["tool_calls"]] == [call["function"]]


def test_no_parser_leaves_the_text(hermes_model_dir):
    fields = {"structured_outputs": {"regex": HERMES_CALL}, "temperature": 0}
    whole, chunks = _run(hermes_model_dir, lambda s: _whole_and_streamed(s, fields), tool_call_parser="none")
    [choice] = whole["choices"]
    assert "tool_calls" not in choice["message"] and choice["message"]["content"].startswith("Checking.\n<tool_call>")
    assert choice["finish_reason"] == "stop"
    assert _accumulate(chunks) == ({"content": choice["message"]["content"], "tool_calls": []}, "stop")
