"""Integral floats inside lists of integers (stop_token_ids, /detokenize's tokens) are those integers, as they
are in integer fields; a fractional one is refused naming its position."""

from __future__ import annotations

import json

from tests.gateway.http_helpers import COMPLETIONS, assert_error, body_for


def _raw(client, path: str, body: dict, replace: tuple[bytes, bytes]):
    raw = json.dumps(body).encode().replace(*replace)
    assert replace[1] in raw
    return client.post(path, content=raw, headers={"Content-Type": "application/json"})


def test_stop_token_ids_take_integral_floats(client, server):
    greedy = client.post(COMPLETIONS, json=body_for(COMPLETIONS, server.model, max_tokens=1, temperature=0))
    text = greedy.json()["choices"][0]["text"]
    ids = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert len(ids) == 1, (text, ids)  # the first greedy token, as an id
    stop = ids[0]
    body = body_for(COMPLETIONS, server.model, max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    ints = client.post(COMPLETIONS, json=body)
    floats = _raw(client, COMPLETIONS, body, (f"[{stop}]".encode(), f"[{stop}.0]".encode()))
    assert ints.status_code == floats.status_code == 200, floats.text
    assert floats.json()["choices"][0]["finish_reason"] == "stop"
    assert floats.json()["choices"][0]["text"] == ints.json()["choices"][0]["text"]
    assert floats.json()["usage"] == ints.json()["usage"]


def test_a_fractional_stop_token_id_is_refused_by_position(client, server):
    r = client.post(COMPLETIONS, json=body_for(COMPLETIONS, server.model, stop_token_ids=[5, 6.5]))
    assert_error(r, 400, param="stop_token_ids[1]")


def test_detokenize_takes_integral_floats(client):
    ints = client.post("/detokenize", json={"tokens": [5, 6, 7]})
    floats = client.post("/detokenize", content=b'{"tokens": [5.0, 6, 7e0]}',
                         headers={"Content-Type": "application/json"})
    assert ints.status_code == floats.status_code == 200, floats.text
    assert floats.json() == ints.json()
    assert_error(client.post("/detokenize", json={"tokens": [5, 0.5]}), 400, param="tokens[1]")
