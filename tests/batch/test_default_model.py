"""The batch runner on the embedded default model: an OpenAI Batch file and a plain one, each answered."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kvgate.cli import main
from tests.batch.helpers import ok_body, read_jsonl, write_jsonl

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_the_default_model_answers_a_batch(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": QUESTION, "max_tokens": 16}},
        {"custom_id": "completion", "method": "POST", "url": "/v1/completions",
         "body": {"model": "gpt-4o-mini", "prompt": "The capital of France is", "max_tokens": 4}},
    ])
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(main, ["batch", "run", str(source), "-o", str(out), "--temperature", "0"])
    assert result.exit_code == 0, result.output
    chat, completion = read_jsonl(out)
    assert "Paris" in ok_body(chat)["choices"][0]["message"]["content"]
    assert "Paris" in ok_body(completion)["choices"][0]["text"]
    assert ok_body(chat)["model"] == "SmolLM2-135M-Instruct"  # the model that answered, not the one named

    simple = tmp_path / "simple.jsonl"
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"id": "q", "messages": QUESTION}])
    result = CliRunner().invoke(main, ["batch", "run", str(plain), "-o", str(simple), "--temperature", "0",
                                       "--max-tokens", "16", "--output-format", "simple"])
    assert result.exit_code == 0, result.output
    [line] = read_jsonl(simple)
    assert line["custom_id"] == "q" and "Paris" in line["text"]
