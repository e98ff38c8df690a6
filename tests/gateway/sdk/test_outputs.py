"""The official `openai` SDK, with strict response validation, against `kvgate serve`: what the answers hold:
logprobs (chat and completions, streamed and not, special tokens), stop strings across tokens, concurrent
requests, completion prompt forms and echo, and cached_tokens from prefix caching. The server is the package's
default one (block_size 16 and prefix caching on, the engine's defaults)."""

from __future__ import annotations

import asyncio
import time

import pytest
from openai import AsyncOpenAI

from tests.gateway.sdk_helpers import (
    EXACT,
    GREEDY,
    IM_START,
    _chat,
    _check_content_bytes,
    _check_usage,
    _client,
    _complete,
    _metric,
    _per_choice,
    _strictly_decodable,
    _validated_completion_chunk,
)

pytestmark = pytest.mark.usefixtures("deadline")


# -- logprobs ----------------------------------------------------------------------------------------------------------


def test_chat_logprobs(server, client):
    k = 3
    kwargs = dict(max_tokens=24, logprobs=True, top_logprobs=k, **GREEDY)
    r = _chat(client, server, **kwargs)
    [choice] = r.choices
    entries = choice.logprobs.content
    assert len(entries) == r.usage.completion_tokens > 0
    _check_content_bytes(choice.message.content, entries, choice.finish_reason)
    clean = True
    for i, e in enumerate(entries):
        assert e.logprob <= 0
        assert len(e.top_logprobs) == k
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)  # greedy: the top token
        if choice.finish_reason == "stop" and i == len(entries) - 1 and not e.bytes:
            assert e.token == ""  # EOS: no text
            continue
        assert e.top_logprobs[0].bytes == e.bytes
        text = _strictly_decodable(e.bytes)
        if text is None:
            clean = False  # half a character: its string shows U+FFFD, its bytes are exact
        else:
            assert e.token == text
        for t in e.top_logprobs:
            if (alt := _strictly_decodable(t.bytes)) is not None:
                assert t.token == alt
    if clean:
        assert "".join(e.token for e in entries) == choice.message.content

    # streamed: the same entries, split over the chunks
    chunks = list(_chat(client, server, stream=True, **kwargs))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs is not None for e in ch.logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-4)

    # without logprobs: none
    assert _chat(client, server, max_tokens=2, **GREEDY).choices[0].logprobs is None


def test_special_tokens_in_logprobs_follow_the_content(server, client):
    """A special token that is not EOS (forced here by logit_bias) is left out of the content by default, so its
    logprobs entry has no text and no bytes either; with skip_special_tokens false both show it."""
    kwargs = dict(max_tokens=3, logit_bias={str(IM_START): 100}, **GREEDY)
    r = _chat(client, server, logprobs=True, top_logprobs=1, extra_body=EXACT, **kwargs)
    [choice] = r.choices
    assert choice.message.content == ""
    assert [(e.token, e.bytes) for e in choice.logprobs.content] == [("", [])] * 3
    r = _chat(client, server, logprobs=True, extra_body={**EXACT, "skip_special_tokens": False}, **kwargs)
    [choice] = r.choices
    assert choice.message.content == "<|im_start|>" * 3
    assert [e.token for e in choice.logprobs.content] == ["<|im_start|>"] * 3
    _check_content_bytes(choice.message.content, choice.logprobs.content, choice.finish_reason)

    r = _complete(client, server, logprobs=1, extra_body=EXACT, **kwargs)
    [choice] = r.choices
    assert choice.text == "" and choice.logprobs.tokens == [""] * 3 and choice.logprobs.text_offset == [0, 0, 0]


def test_completion_logprobs(server, client):
    k = 3
    kwargs = dict(prompt="The quick brown fox", max_tokens=20, logprobs=k, extra_body=EXACT, **GREEDY)
    r = _complete(client, server, **kwargs)
    [choice] = r.choices
    lp = choice.logprobs
    n = r.usage.completion_tokens
    assert n == 20
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset[0] == 0
    for i in range(n - 1):
        assert lp.text_offset[i + 1] == lp.text_offset[i] + len(lp.tokens[i])
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= k  # tokens with the same string share one key
        assert token in top
        if "\ufffd" not in token:
            assert top[token] == pytest.approx(value, abs=1e-5)  # greedy: the top token
    if not any("\ufffd" in t for t in lp.tokens):
        assert "".join(lp.tokens) == choice.text

    chunks = list(_complete(client, server, stream=True, **kwargs))
    pieces = [ch.logprobs for c in chunks for ch in c.choices if ch.logprobs is not None]
    assert [t for p in pieces for t in p.tokens] == lp.tokens
    assert [o for p in pieces for o in p.text_offset] == lp.text_offset  # offsets continue across chunks
    assert [v for p in pieces for v in p.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-4)


# -- stop strings ------------------------------------------------------------------------------------------------------


def _boundary_stop(text: str, tokens: list[str]) -> tuple[str, int]:
    """A stop string of >= 2 characters that starts inside one token and ends in the next, and whose first
    occurrence in `text` is there; also where it starts."""
    pos = 0
    for i in range(len(tokens) - 1):
        a, b = tokens[i], tokens[i + 1]
        if not text.startswith("".join(tokens[: i + 2])):
            break  # a half character: token strings no longer line up with the text
        end = pos + len(a)
        for left in range(1, len(a)):  # strictly inside a
            for right in range(1, len(b) + 1):
                stop = text[end - left: end + right]
                if "\ufffd" not in stop and text.find(stop) == end - left:
                    return stop, end - left
        pos = end
    raise AssertionError(f"no token boundary to stop at in {tokens!r}")


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_stop_string_spanning_tokens(server, client, kind):
    create = _chat if kind == "chat" else _complete
    kwargs = dict(max_tokens=20, extra_body=EXACT, **GREEDY)
    if kind == "chat":
        r = create(client, server, logprobs=True, **kwargs)
        text, tokens = r.choices[0].message.content, [e.token for e in r.choices[0].logprobs.content]
    else:
        r = create(client, server, prompt="The quick brown fox", logprobs=1, **kwargs)
        text, tokens = r.choices[0].text, r.choices[0].logprobs.tokens
        kwargs["prompt"] = "The quick brown fox"
    assert r.choices[0].finish_reason == "length"
    stop, cut = _boundary_stop(text, tokens)
    assert len(stop) >= 2

    def answer(resp) -> tuple[str, str]:
        [c] = resp.choices
        return (c.message.content if kind == "chat" else c.text), c.finish_reason

    assert answer(create(client, server, stop=stop, **kwargs)) == (text[:cut], "stop")
    assert answer(create(client, server, stop=["\x00never", stop], **kwargs)) == (text[:cut], "stop")
    kept = create(client, server, stop=stop, **{**kwargs, "extra_body": {**EXACT, "include_stop_str_in_output": True}})
    assert answer(kept) == (text[:cut] + stop, "stop")

    chunks = list(create(client, server, stop=stop, stream=True, **kwargs))
    texts, finishes = _per_choice(chunks, kind)
    assert texts == {0: text[:cut]} and finishes[0][-1] == "stop"
    assert all(f is None for f in finishes[0][:-1])


# -- concurrency -------------------------------------------------------------------------------------------------------


def test_concurrent_requests(server):
    async def one(client: AsyncOpenAI, loose: AsyncOpenAI, i: int):
        max_tokens = 3 + i % 7
        common = dict(model=server.model, max_tokens=max_tokens, extra_body=EXACT, temperature=0.7, seed=i)
        stream = i % 2 == 1
        extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        if i % 4 < 2:
            resp = await client.chat.completions.create(
                messages=[{"role": "user", "content": f"Request number {i}: " + "hello " * (i % 5)}], **common,
                **extra)
        else:
            resp = await (loose if stream else client).completions.create(
                prompt=f"Request number {i}: " + "sea " * (i % 5), **common, **extra)
        if stream:
            chunks = [c async for c in resp]
            if i % 4 >= 2:
                chunks = [_validated_completion_chunk(c) for c in chunks]
            finish = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason is not None]
            assert chunks[-1].choices == []
            return max_tokens, finish, chunks[-1].usage
        return max_tokens, [resp.choices[0].finish_reason], resp.usage

    async def main():
        async with _client(server, AsyncOpenAI) as client, _client(server, AsyncOpenAI, strict=False) as loose:
            return await asyncio.gather(*(one(client, loose, i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32
    for max_tokens, finish, usage in results:
        assert finish == ["length"]
        _check_usage(usage)
        assert usage.completion_tokens == max_tokens

    deadline = time.monotonic() + 10
    while _metric(server, "kvgate:num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, "kvgate:num_requests_running") == 0
    assert _metric(server, "kvgate:num_requests_waiting") == 0


# -- prompt forms ------------------------------------------------------------------------------------------------------


def test_completion_prompt_forms(server, client, tiny_tokenizer):
    prompts = ["The quick brown fox", "Hello, how are you today?"]
    ids = [tiny_tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    kwargs = dict(max_tokens=6, extra_body=EXACT, **GREEDY)
    singles = [_complete(client, server, prompt=p, **kwargs) for p in prompts]
    expected = [s.choices[0].text for s in singles]
    assert [s.usage.prompt_tokens for s in singles] == [len(i) for i in ids]

    r = _complete(client, server, prompt=ids[0], **kwargs)
    assert [c.text for c in r.choices] == [expected[0]] and r.usage.prompt_tokens == len(ids[0])

    for form in (prompts, ids):
        r = _complete(client, server, prompt=form, n=2, **kwargs)
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        assert {c.index: c.text for c in r.choices} == {p * 2 + i: expected[p] for p in range(2) for i in range(2)}
        assert r.usage.prompt_tokens == sum(len(i) for i in ids) and r.usage.completion_tokens == 24

        chunks = list(_complete(client, server, prompt=form, n=2, stream=True, **kwargs))
        texts, finishes = _per_choice(chunks, "completion")
        assert texts == {p * 2 + i: expected[p] for p in range(2) for i in range(2)}
        assert all(f[-1] == "length" and all(x is None for x in f[:-1]) for f in finishes.values())

    # echo: the prompt text, then the completion
    r = _complete(client, server, prompt=prompts[0], echo=True, **kwargs)
    assert r.choices[0].text == prompts[0] + expected[0]
    r = _complete(client, server, prompt=ids, echo=True, **kwargs)
    assert [c.text for c in r.choices] == [tiny_tokenizer.decode(i) + e for i, e in zip(ids, expected)]
    chunks = list(_complete(client, server, prompt=prompts[0], echo=True, stream=True, **kwargs))
    assert _per_choice(chunks, "completion")[0] == {0: prompts[0] + expected[0]}


# -- prefix caching ----------------------------------------------------------------------------------------------------


def test_prefix_caching_reports_cached_tokens(server, client):
    prompt = ("A journey of a thousand miles begins with a single step, and every night the small model wrote down "
              "what it had learned about the mountains, the city and the stars in a little notebook. ") * 2
    kwargs = dict(prompt=prompt, max_tokens=2, extra_body=EXACT, **GREEDY)
    first = _complete(client, server, **kwargs)
    assert first.usage.prompt_tokens >= 3 * 16
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    hits_before = _metric(server, "kvgate:prefix_cache_hits_total")

    second = _complete(client, server, **kwargs)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens and cached % 16 == 0
    assert cached >= 2 * 16
    assert second.choices[0].text == first.choices[0].text

    chunks = list(_complete(client, server, stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    assert _metric(server, "kvgate:prefix_cache_hits_total") >= hits_before + 2 * cached
