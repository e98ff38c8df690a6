"""A real `kvgate serve` process driven by the official `openai` SDK with strict response validation: every body
and stream chunk must parse as the SDK's own types, and the values must follow OpenAI's specification (ids,
objects, usage, stream framing, logprobs, stop strings, errors).

One server serves the whole module (the tiny random Llama: gibberish, but deterministic at temperature 0)."""

from __future__ import annotations

import asyncio
import codecs
import re
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types import Completion

from tests.server import running_server

pytestmark = pytest.mark.usefixtures("deadline")

CHAT = [{"role": "user", "content": "Tell me a story about the sea."}]
PROMPT = "Once upon a time there was"
GREEDY = {"temperature": 0}
EXACT = {"ignore_eos": True}  # extra_body: the random model may emit EOS early; this gives exactly max_tokens
IM_START = 1  # a special token of the tiny tokenizer that is not EOS (see tests/checkpoints.py)


def _client(server, cls=OpenAI, strict: bool = True):
    return cls(base_url=server.base_url, api_key="x", _strict_response_validation=strict, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_server(tiny_llama_dir, "--max-model-len", "256", "--max-num-seqs", "64", "--block-size", "16",
                        "--enable-prefix-caching") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with _client(server) as c:
        yield c


# -- helpers ----------------------------------------------------------------------------------------------------------


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


# -- 1. shapes --------------------------------------------------------------------------------------------------------


def test_chat_and_completions_shapes(server, client):
    fingerprints = set()

    r = _chat(client, server, max_tokens=8, **GREEDY)
    _check_head(r, server, "chatcmpl-", "chat.completion")
    [choice] = r.choices
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    _check_usage(r.usage)
    assert r.usage.completion_tokens <= 8
    assert (r.usage.completion_tokens == 8) == (choice.finish_reason == "length")
    fingerprints.add(r.system_fingerprint)

    chunks = list(_chat(client, server, max_tokens=8, stream=True, **GREEDY))
    assert len(chunks) >= 2
    for chunk in chunks:
        _check_head(chunk, server, "chatcmpl-", "chat.completion.chunk")
        assert chunk.usage is None and len(chunk.choices) == 1 and chunk.choices[0].index == 0
        fingerprints.add(chunk.system_fingerprint)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    r = _complete(client, server, max_tokens=8, **GREEDY)
    _check_head(r, server, "cmpl-", "text_completion")
    [choice] = r.choices
    assert choice.index == 0 and isinstance(choice.text, str) and choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    _check_usage(r.usage)
    assert (r.usage.completion_tokens == 8) == (choice.finish_reason == "length")
    fingerprints.add(r.system_fingerprint)

    chunks = list(_complete(client, server, max_tokens=8, stream=True, **GREEDY))
    assert chunks
    for chunk in chunks:
        _check_head(chunk, server, "cmpl-", "text_completion")
        assert chunk.usage is None and len(chunk.choices) == 1 and chunk.choices[0].index == 0
        fingerprints.add(chunk.system_fingerprint)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    assert len(fingerprints) == 1, fingerprints  # one server, one configuration


# -- 2. streamed == not streamed ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_stream_matches_non_stream(server, client, kind):
    create = _chat if kind == "chat" else _complete
    kwargs = dict(max_tokens=16, n=2, **GREEDY)
    whole = create(client, server, **kwargs)
    chunks = list(create(client, server, stream=True, **kwargs))

    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].id != whole.id
    texts, finishes = _per_choice(chunks, kind)
    expected = {c.index: (c.message.content if kind == "chat" else c.text) for c in whole.choices}
    assert texts == expected
    for choice in whole.choices:
        reasons = finishes[choice.index]
        assert all(r is None for r in reasons[:-1]), reasons
        assert reasons[-1] == choice.finish_reason
    if kind == "chat":
        seen: set[int] = set()
        for chunk in chunks:
            for choice in chunk.choices:
                # the first delta of each choice carries the role, no later one does
                assert choice.delta.role == (None if choice.index in seen else "assistant")
                seen.add(choice.index)
        assert chunks[0].choices[0].delta.role == "assistant"


# -- 3. n and seed -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_n_choices_and_seed(server, client, kind):
    create = _chat if kind == "chat" else _complete
    kwargs = dict(n=3, max_tokens=10, temperature=1.0, seed=1234, extra_body=EXACT)

    first = create(client, server, **kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert first.usage.completion_tokens == 30 and all(c.finish_reason == "length" for c in first.choices)
    texts = {c.index: (c.message.content if kind == "chat" else c.text) for c in first.choices}

    again = create(client, server, **kwargs)
    assert {c.index: (c.message.content if kind == "chat" else c.text) for c in again.choices} == texts

    chunks = list(create(client, server, stream=True, **kwargs))
    streamed, finishes = _per_choice(chunks, kind)
    assert sorted(streamed) == [0, 1, 2] and streamed == texts  # the seed decides, not the way of answering
    assert all(f[-1] == "length" for f in finishes.values())

    # choices that end at different steps: a stop string found early in one choice and not in another ends that
    # choice first while its siblings go on; each choice still has exactly one chunk with a finish_reason, its last
    stop = next((ch for ch in dict.fromkeys("".join(texts.values()))
                 if ch.isascii() and ch.isprintable() and any(ch not in t for t in texts.values())
                 and any(0 <= t.find(ch) < len(t) // 2 for t in texts.values())), None)
    assert stop is not None, texts
    expected = {i: t.split(stop)[0] for i, t in texts.items()}
    reasons = {i: "stop" if stop in t else "length" for i, t in texts.items()}
    whole = create(client, server, stop=stop, **kwargs)
    assert {c.index: (c.message.content if kind == "chat" else c.text) for c in whole.choices} == expected
    assert {c.index: c.finish_reason for c in whole.choices} == reasons
    chunks = list(create(client, server, stop=stop, stream=True, **kwargs))
    streamed, finishes = _per_choice(chunks, kind)
    assert streamed == expected
    for i, f in finishes.items():
        assert f[-1] == reasons[i] and all(r is None for r in f[:-1]), (i, f)


# -- 4. usage and the usage chunk --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_usage_chunk(server, client, kind):
    create = _chat if kind == "chat" else _complete
    kwargs = dict(max_tokens=6, n=2, extra_body=EXACT, **GREEDY)
    whole = create(client, server, **kwargs)
    _check_usage(whole.usage)
    assert whole.usage.completion_tokens == 12

    chunks = list(create(client, server, stream=True, stream_options={"include_usage": True}, **kwargs))
    *body, last = chunks
    assert body and all(c.usage is None and c.choices for c in body)
    assert last.choices == [] and last.usage is not None
    _check_usage(last.usage)
    assert _totals(last.usage) == _totals(whole.usage)
    assert last.id == body[0].id and last.created == body[0].created

    # include_usage false: no usage anywhere, no empty chunk
    chunks = list(create(client, server, stream=True, stream_options={"include_usage": False}, **kwargs))
    assert all(c.usage is None and c.choices for c in chunks)


# -- 5. logprobs -------------------------------------------------------------------------------------------------------


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


# -- 6. stop strings ---------------------------------------------------------------------------------------------------


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


# -- 7. max_tokens -----------------------------------------------------------------------------------------------------


def test_max_tokens_gives_length(server, client):
    r = _complete(client, server, max_tokens=7, extra_body=EXACT, **GREEDY)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    chunks = list(_complete(client, server, max_tokens=7, stream=True, stream_options={"include_usage": True},
                            extra_body=EXACT, **GREEDY))
    assert chunks[-1].usage.completion_tokens == 7 and chunks[-2].choices[0].finish_reason == "length"

    for limit in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        r = _chat(client, server, extra_body=EXACT, **limit, **GREEDY)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5, limit
        chunks = list(_chat(client, server, stream=True, stream_options={"include_usage": True}, extra_body=EXACT,
                            **limit, **GREEDY))
        assert chunks[-1].usage.completion_tokens == 5 and chunks[-2].choices[0].finish_reason == "length"
    # max_completion_tokens wins over the deprecated max_tokens
    r = _chat(client, server, max_tokens=9, max_completion_tokens=4, extra_body=EXACT, **GREEDY)
    assert r.usage.completion_tokens == 4


# -- 8. concurrency ----------------------------------------------------------------------------------------------------


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


# -- 9. prompt forms ---------------------------------------------------------------------------------------------------


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


# -- 10. models --------------------------------------------------------------------------------------------------------


def test_models(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]
    [card] = models.data
    assert card.object == "model" and isinstance(card.created, int) and card.owned_by

    model = client.models.retrieve(server.model)
    assert model.id == server.model and model.object == "model" and model.created == card.created

    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.status_code == 404 and info.value.code == "model_not_found"

    for call in (lambda: client.completions.create(model="no-such-model", prompt="hi", max_tokens=1),
                 lambda: client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=1)):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        err = info.value
        assert err.code == "model_not_found" and err.param == "model" and "no-such-model" in err.message


# -- 11. errors --------------------------------------------------------------------------------------------------------


def _bad_request(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    err = info.value
    assert err.status_code == 400
    assert isinstance(err.body, dict) and set(err.body) == {"message", "type", "param", "code"}
    assert err.response.json() == {"error": err.body}
    assert err.body["type"] == err.type == "invalid_request_error"
    assert isinstance(err.body["message"], str) and err.body["message"]
    assert err.code == err.body["code"] and err.param == err.body["param"]
    return err


def test_bad_requests(server, client):
    for stream in (False, True):  # a bad streamed request fails before the stream starts
        err = _bad_request(lambda: _complete(client, server, max_tokens=1000, stream=stream))
        assert "maximum context length" in err.message and err.param == "max_tokens"
        assert err.code == "context_length_exceeded"

    long = "the sea " * 200
    err = _bad_request(lambda: _complete(client, server, prompt=long, max_tokens=1))
    assert "maximum context length" in err.message and err.param == "prompt"
    err = _bad_request(lambda: _chat(client, server, messages=[{"role": "user", "content": long}], max_tokens=1))
    assert "maximum context length" in err.message and err.param in ("messages", "prompt")
    err = _bad_request(lambda: _chat(client, server, max_completion_tokens=1000))
    assert "maximum context length" in err.message and err.code == "context_length_exceeded"

    err = _bad_request(lambda: _chat(client, server, temperature=5.0, max_tokens=1))
    assert err.param == "temperature"
    err = _bad_request(lambda: _chat(client, server, top_logprobs=2, max_tokens=1))
    assert err.param == "top_logprobs"
    err = _bad_request(lambda: _complete(client, server, prompt=[], max_tokens=1))
    assert err.param == "prompt"
    err = _bad_request(lambda: _complete(client, server, prompt=[10**9], max_tokens=1))
    assert err.param == "prompt"

    # the server still answers
    assert _complete(client, server, max_tokens=1).usage.completion_tokens == 1


# -- 12. prefix caching ------------------------------------------------------------------------------------------------


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


# -- the embedded default model ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_answers_paris():
    with running_server(None, "--max-model-len", "512", "--num-kv-blocks", "128") as server, _client(server) as client:
        r = client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=32, logprobs=True, top_logprobs=2)
        _check_head(r, server, "chatcmpl-", "chat.completion")
        [choice] = r.choices
        content = choice.message.content
        assert "Paris" in content, content
        entries = choice.logprobs.content
        assert len(entries) == r.usage.completion_tokens
        _check_content_bytes(content, entries, choice.finish_reason)
        assert "".join(e.token for e in entries) == content
