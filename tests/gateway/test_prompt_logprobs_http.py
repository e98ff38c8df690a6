"""Prompt logprobs over HTTP, against the package's default server (the tiny llama): `echo` with `logprobs` on
/v1/completions (the prompt's tokens first, the first one's logprob and top_logprobs null, exact against
transformers), `max_tokens: 0` with echo (the prompt alone), the echo chunk of a stream, vLLM's
`prompt_logprobs` field (per choice on completions, on the response for chat), and the 400s of bad input."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from tests.checkpoints import hf_logprobs
from tests.gateway.http_helpers import CHAT, COMPLETIONS, assert_error, body_for
from tests.gateway.sdk_helpers import _client

pytestmark = pytest.mark.usefixtures("deadline")

TOL = 1e-4
IDS = [random.Random(7).randrange(4, 500) for _ in range(40)]  # no special tokens


def _post(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _check_prompt_part(logprobs: dict, ref, k: int) -> None:
    """The first len(IDS) entries: null first, then HF's logprob of each prompt token and its top k."""
    n = len(IDS)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["text_offset"][0] == 0
    assert logprobs["text_offset"][:n] == sorted(logprobs["text_offset"][:n])
    for i in range(1, n):
        assert logprobs["token_logprobs"][i] == pytest.approx(ref[i - 1, IDS[i]].item(), abs=TOL), i
        top = logprobs["top_logprobs"][i]
        assert 1 <= len(top) <= k  # two tokens may read alike: the likelier keeps the key
        assert max(top.values()) == pytest.approx(ref[i - 1].max().item(), abs=TOL), i
        assert all(v >= ref[i - 1].topk(k).values[-1].item() - TOL for v in top.values()), i


def test_echo_with_logprobs(server, client, tiny_llama_dir, tiny_tokenizer):
    ref = hf_logprobs(tiny_llama_dir, IDS)
    base = {"model": server.model, "prompt": IDS, "logprobs": 3, "temperature": 0}
    plain = _post(client, COMPLETIONS, {**base, "max_tokens": 4})["choices"][0]
    echoed = _post(client, COMPLETIONS, {**base, "max_tokens": 4, "echo": True})
    [choice] = echoed["choices"]
    prompt_text = tiny_tokenizer.decode(IDS)
    assert choice["text"] == prompt_text + plain["text"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(IDS) + 4 == echoed["usage"]["total_tokens"]
    _check_prompt_part(lp, ref, 3)
    # then the completion's tokens, as without echo, their offsets after the echoed text
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert lp[key][len(IDS):] == plain["logprobs"][key]
    assert [o + len(prompt_text) for o in plain["logprobs"]["text_offset"]] == lp["text_offset"][len(IDS):]

    alone = _post(client, COMPLETIONS, {**base, "max_tokens": 0, "echo": True})
    [only] = alone["choices"]
    assert (only["text"], only["finish_reason"]) == (prompt_text, "length")
    assert alone["usage"]["completion_tokens"] == 0 and alone["usage"]["prompt_tokens"] == len(IDS)
    assert {k: v[: len(IDS)] for k, v in lp.items()} == only["logprobs"]

    # echo and max_tokens 0 without logprobs: the prompt text alone
    bare = _post(client, COMPLETIONS, {"model": server.model, "prompt": "hello there", "max_tokens": 0, "echo": True})
    assert [(c["text"], c["logprobs"], c["finish_reason"]) for c in bare["choices"]] == [
        ("hello there", None, "length")]

    # the official SDK reads it (not strictly: OpenAI's own schema says numbers where it sends the first null)
    with _client(server, strict=False) as sdk:
        r = sdk.completions.create(model=server.model, prompt=IDS, echo=True, logprobs=3, max_tokens=0)
    assert r.choices[0].logprobs.token_logprobs == only["logprobs"]["token_logprobs"]


def test_echo_stream_chunk_carries_the_prompt_logprobs(server, client):
    body = {"model": server.model, "prompt": [IDS, IDS[:9]], "logprobs": 2, "max_tokens": 3, "echo": True,
            "temperature": 0, "n": 2, "stream": True}
    whole = _post(client, COMPLETIONS, {**body, "stream": False})["choices"]
    chunks = []
    with client.stream("POST", COMPLETIONS, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.extend(json.loads(line[6:])["choices"])
    assert {c["index"] for c in chunks} == {0, 1, 2, 3}
    for expected in whole:
        mine = [c for c in chunks if c["index"] == expected["index"]]
        prompt_len = len(IDS) if expected["index"] < 2 else 9
        assert mine[0]["logprobs"]["token_logprobs"][0] is None  # the echo chunk comes first
        assert len(mine[0]["logprobs"]["tokens"]) == prompt_len
        assert "".join(c["text"] for c in mine) == expected["text"]
        merged = {k: sum((c["logprobs"][k] for c in mine), []) for k in expected["logprobs"]}
        want = expected["logprobs"]
        assert (merged["tokens"], merged["text_offset"]) == (want["tokens"], want["text_offset"])
        assert merged["token_logprobs"][1:] == pytest.approx(want["token_logprobs"][1:], abs=TOL)  # other batches
        for got, top in zip(merged["top_logprobs"][1:], want["top_logprobs"][1:]):
            assert got == pytest.approx(top, abs=TOL)
        assert [c["finish_reason"] for c in mine][-1] == "length"


def test_vllm_prompt_logprobs_field(server, client, tiny_llama_dir):
    ref = hf_logprobs(tiny_llama_dir, IDS)
    r = _post(client, COMPLETIONS, {"model": server.model, "prompt": IDS, "prompt_logprobs": 2, "max_tokens": 1,
                                    "n": 2})
    assert len(r["choices"]) == 2
    for choice in r["choices"]:
        body = choice["prompt_logprobs"]
        assert len(body) == len(IDS) and body[0] is None
        for i in range(1, len(IDS)):
            entry = body[i]
            first = next(iter(entry))
            assert first == str(IDS[i])  # the prompt token first, then its 2 most likely alternatives
            assert entry[first]["logprob"] == pytest.approx(ref[i - 1, IDS[i]].item(), abs=TOL)
            row, rank = ref[i - 1], entry[first]["rank"]
            assert int((row > row[IDS[i]] + 1e-5).sum()) + 1 <= rank <= int((row > row[IDS[i]] - 1e-5).sum())
            assert sorted(v["rank"] for v in entry.values() if v["rank"] <= 2) == [1, 2]
            assert all(isinstance(v["decoded_token"], str) for v in entry.values())
    assert "prompt_logprobs" not in _post(client, COMPLETIONS, body_for(COMPLETIONS, server.model))["choices"][0]

    chat = _post(client, CHAT, body_for(CHAT, server.model, prompt_logprobs=0))
    body = chat["prompt_logprobs"]  # vLLM puts chat's on the response, not the choice
    assert len(body) == chat["usage"]["prompt_tokens"] and body[0] is None
    assert all(len(entry) == 1 and next(iter(entry.values()))["logprob"] <= 0 for entry in body[1:])
    assert "prompt_logprobs" not in chat["choices"][0]


@pytest.mark.parametrize("path, changes, param", [
    (CHAT, {"echo": True}, "echo"),
    (CHAT, {"prompt_logprobs": 21}, "prompt_logprobs"),
    (COMPLETIONS, {"prompt_logprobs": 21}, "prompt_logprobs"),
    (COMPLETIONS, {"prompt_logprobs": -1}, "prompt_logprobs"),
    (COMPLETIONS, {"prompt_logprobs": "2"}, "prompt_logprobs"),
    (CHAT, {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    (COMPLETIONS, {"prompt_logprobs": 0, "stream": True}, "prompt_logprobs"),
    (COMPLETIONS, {"max_tokens": 0}, "max_tokens"),  # without echo or prompt_logprobs there is nothing to answer
    (COMPLETIONS, {"echo": True, "logprobs": 21}, "logprobs"),
])
def test_bad_input(client, server, path, changes, param):
    assert_error(client.post(path, json=body_for(path, server.model, **changes)), 400, param)


@pytest.mark.parametrize("path, changes", [
    (CHAT, {"echo": False}), (COMPLETIONS, {"echo": True, "logprobs": 20, "max_tokens": 0}),
    (COMPLETIONS, {"prompt_logprobs": 20, "max_tokens": 0}), (COMPLETIONS, {"echo": True, "logprobs": 0}),
])
def test_valid_edges(client, server, path, changes):
    r = client.post(path, json=body_for(path, server.model, **changes))
    assert r.status_code == 200, r.text


def test_the_server_still_serves(server):
    """After every refusal above: an ordinary request still works."""
    r = httpx.post(server.url + COMPLETIONS, json=body_for(COMPLETIONS, server.model), timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
