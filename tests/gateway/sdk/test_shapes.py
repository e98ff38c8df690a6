"""The official `openai` SDK, with strict response validation, against `kvgate serve`: every body and stream
chunk must parse as the SDK's own types and follow OpenAI's specification: ids, objects and fingerprints, streamed
== not streamed, n and seed, usage and the usage chunk, max_tokens, models, errors. The server is the package's
default one (the tiny random Llama: gibberish, but deterministic at temperature 0); the slow test starts its own
with the embedded default model."""

from __future__ import annotations

import openai
import pytest

from tests.gateway.sdk_helpers import (
    CHAT,
    EXACT,
    GREEDY,
    _chat,
    _check_content_bytes,
    _check_head,
    _check_usage,
    _client,
    _complete,
    _per_choice,
    _totals,
)
from tests.server import running_server

pytestmark = pytest.mark.usefixtures("deadline")


# -- shapes -----------------------------------------------------------------------------------------------------------


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


# -- streamed == not streamed ------------------------------------------------------------------------------------------


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


# -- n and seed --------------------------------------------------------------------------------------------------------


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


# -- usage and the usage chunk -----------------------------------------------------------------------------------------


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


# -- max_tokens --------------------------------------------------------------------------------------------------------


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


# -- models ------------------------------------------------------------------------------------------------------------


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


# -- errors ------------------------------------------------------------------------------------------------------------


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
