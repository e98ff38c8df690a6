"""The batch answers exactly what `kvgate serve` answers for the same request body: at temperature 0 the same
response body (but for its id, timestamp and fingerprint), and for a bad body the same status and error body.

One real server and one real `kvgate batch run` (its engine core spawned, as users run it). --max-in-flight 1
and the server asked one request at a time, in the same order: the two engines see the same batches (a
one-prompt request runs alone) and the same prefix-cache state, so even logprobs and cached_tokens agree."""

from __future__ import annotations

import httpx
import pytest

from tests.batch.helpers import CHAT, COMPLETIONS, LONG_PROMPT, MAX_LEN, read_jsonl, request, stable, write_jsonl
from tests.server import running_server

pytestmark = pytest.mark.usefixtures("deadline")

HI = [{"role": "user", "content": "hi there"}]
GOOD = [  # (custom_id, url, body): temperature 0
    ("chat", CHAT, {"messages": HI, "max_tokens": 6, "temperature": 0}),
    ("chat-logprobs", CHAT, {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "x"}],
                             "max_completion_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2}),
    ("completion", COMPLETIONS, {"prompt": "the cat sat", "max_tokens": 5, "temperature": 0, "ignore_eos": True}),
    ("completion-logprobs", COMPLETIONS, {"prompt": "one two", "max_tokens": 3, "temperature": 0, "logprobs": 2}),
    # two prompts: whether they share engine steps is a matter of timing, so no logprobs (float noise) here
    ("completion-prompts", COMPLETIONS, {"prompt": ["a dog", "four five"], "max_tokens": 3, "temperature": 0,
                                         "echo": True, "stop": ["zz"]}),
]
BAD = [  # (custom_id, url, body): bodies the gateway refuses
    ("context", COMPLETIONS, {"prompt": LONG_PROMPT}),
    ("chat-context", CHAT, {"messages": [{"role": "user", "content": LONG_PROMPT}]}),
    ("max-tokens", CHAT, {"messages": HI, "max_tokens": 2 * MAX_LEN}),
    ("temperature", COMPLETIONS, {"prompt": "x", "temperature": -1}),
    ("type", COMPLETIONS, {"prompt": "x", "max_tokens": "three"}),
    ("missing", CHAT, {"max_tokens": 2}),
    ("content-part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("tools", CHAT, {"messages": HI, "tools": [{"type": "function", "function": {"name": "f g"}}]}),
    ("top-logprobs", CHAT, {"messages": HI, "top_logprobs": 2}),
    ("best-of", COMPLETIONS, {"prompt": "x", "best_of": 3}),
    ("other-model", COMPLETIONS, {"prompt": "x", "model": "gpt-4o"}),  # --strict-model, as the server is
]


def test_batch_bodies_and_errors_equal_the_servers(tmp_path, tiny_llama_dir, batch_cli):
    with running_server(tiny_llama_dir, "--max-model-len", str(MAX_LEN)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            answers = {cid: client.post(url, json={"model": server.model, **body}) for cid, url, body in GOOD + BAD}
    rows = [request(cid, url, {"model": tiny_llama_dir.name, **body}) for cid, url, body in GOOD + BAD]
    out = tmp_path / "out.jsonl"
    result = batch_cli(write_jsonl(tmp_path / "in.jsonl", rows), "-o", out, "--max-in-flight", "1",
                       "--strict-model")
    assert result.exit_code == 1, result.output
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == [cid for cid, _, _ in GOOD + BAD]
    for line in lines:
        http = answers[line["custom_id"]]
        assert line["response"]["status_code"] == http.status_code, (line, http.text)
        if http.status_code == 200:
            assert stable(line["response"]["body"]) == stable(http.json()), line["custom_id"]
        else:
            assert line["response"]["body"] == http.json(), line["custom_id"]
    assert {answers[cid].status_code for cid, _, _ in GOOD} == {200}
    assert {answers[cid].status_code for cid, _, _ in BAD} == {400, 404}
    assert answers["context"].json()["error"]["code"] == "context_length_exceeded"
