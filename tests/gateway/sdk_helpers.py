"""Constants and helpers of the gateway's `openai` SDK tests: clients, checks of ids, objects and usage,
per-choice stream assembly, completion chunks validated by hand, logprob bytes, /metrics samples."""

from __future__ import annotations

import codecs
import re
import time

import httpx
from openai import OpenAI
from openai.types import Completion

CHAT = [{"role": "user", "content": "Tell me a story about the sea."}]
PROMPT = "Once upon a time there was"
GREEDY = {"temperature": 0}
EXACT = {"ignore_eos": True}  # extra_body: the random model may emit EOS early; this gives exactly max_tokens
IM_START = 1  # a special token of the tiny tokenizer that is not EOS (see tests/checkpoints.py)


def _client(server, cls=OpenAI, strict: bool = True):
    return cls(base_url=server.base_url, api_key="x", _strict_response_validation=strict, max_retries=0, timeout=60)


def _check_head(resp, server, prefix: str, obj: str) -> None:
    assert resp.id.startswith(prefix) and len(resp.id) > len(prefix), resp.id
    assert resp.object == obj
    assert isinstance(resp.created, int) and abs(resp.created - time.time()) < 600
    assert resp.model == server.model
    assert isinstance(resp.system_fingerprint, str) and resp.system_fingerprint


def _check_usage(usage) -> None:
    assert usage is not None
    assert usage.prompt_tokens > 0 and usage.completion_tokens >= 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    cached = usage.prompt_tokens_details.cached_tokens
    assert 0 <= cached <= usage.prompt_tokens


def _totals(usage) -> tuple[int, int, int]:
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def _chunk_text(kind: str, choice) -> str:
    return (choice.delta.content or "") if kind == "chat" else choice.text


def _per_choice(chunks, kind: str) -> tuple[dict[int, str], dict[int, list]]:
    """The text of each choice and the finish_reason of each of its chunks, in order."""
    texts: dict[int, str] = {}
    finishes: dict[int, list] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + _chunk_text(kind, choice)
            finishes.setdefault(choice.index, []).append(choice.finish_reason)
    return texts, finishes


def _chat(client, server, **kwargs):
    return client.chat.completions.create(model=server.model, messages=kwargs.pop("messages", CHAT), **kwargs)


def _complete(client, server, **kwargs):
    if kwargs.get("stream"):
        with _client(server, strict=False) as loose:
            stream = loose.completions.create(model=server.model, prompt=kwargs.pop("prompt", PROMPT), **kwargs)
            return [_validated_completion_chunk(chunk) for chunk in stream]
    return client.completions.create(model=server.model, prompt=kwargs.pop("prompt", PROMPT), **kwargs)


def _validated_completion_chunk(chunk: Completion) -> Completion:
    """Streamed completions send finish_reason null on every chunk of a choice but its last, as OpenAI's hosted
    API does; the SDK types them with its non-streamed Completion, whose finish_reason is not nullable, so its
    strict validation refuses them (openai/openai-openapi#100). Such chunks come through a non-validating client
    and are validated here strictly, a null finish_reason aside."""
    data = chunk.to_dict(mode="json")
    for choice in data["choices"]:
        assert choice["finish_reason"] in (None, "stop", "length", "content_filter")
        choice["finish_reason"] = choice["finish_reason"] or "stop"
    Completion.model_validate(data)
    return chunk


def _decoded(raw: bytes) -> tuple[str, str]:
    """The text of these UTF-8 bytes (invalid bytes as U+FFFD, as tokenizers decode them), whole and with a
    trailing incomplete character held back (what a completion cut by max_tokens shows)."""
    held = codecs.getincrementaldecoder("utf-8")("replace").decode(raw, final=False)
    return raw.decode("utf-8", "replace"), held


def _check_content_bytes(content: str, entries, finish_reason: str) -> None:
    raw = b"".join(bytes(e.bytes) for e in entries)
    whole, held = _decoded(raw)
    assert content == whole or (finish_reason == "length" and content == held), (content, raw)


def _strictly_decodable(raw: list[int]) -> str | None:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    m = re.search(rf'^{re.escape(name)}\{{[^}}]*model_name="{re.escape(server.model)}"[^}}]*\}} (\S+)$', text,
                  re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))
