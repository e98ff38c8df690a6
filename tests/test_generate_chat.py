"""`kvgate generate` and `kvgate chat`: streamed answers equal to the HF greedy reference, --json bodies built by
the gateway's Service, bad input as a one-line error, and a real terminal for conversations and Ctrl-C."""

from __future__ import annotations

import json
import sys
import time

import pytest
from click.testing import CliRunner

from kvgate.cli import main
from tests.checkpoints import hf_greedy
from tests.terminal import Terminal

pytestmark = pytest.mark.usefixtures("deadline")

KVGATE = [sys.executable, "-m", "kvgate"]
SYSTEM = {"role": "system", "content": "be terse"}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> str:
    """A preset with the engine core in the test process: no core process to start for each command."""
    path = tmp_path_factory.mktemp("cli") / "in_process.toml"
    path.write_text("[engine]\nin_process = true\nnum_kv_blocks = 64\n")
    return str(path)


def greedy_text(model_dir, tokenizer, ids: list[int], n: int, ignore_eos: bool = True) -> str:
    tokens = hf_greedy(model_dir, [ids], n, ignore_eos=ignore_eos)[0]
    # the answer is cut by max_tokens: a trailing half character is not printed
    return tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def generate(model_dir, preset: str, *args: str, stdin: str | None = None):
    return CliRunner().invoke(main, ["generate", "--model", str(model_dir), "--config", preset, *args], input=stdin)


def test_generate_raw_streams_the_greedy_answer(tiny_llama_dir, tiny_tokenizer, in_process):
    expected = greedy_text(tiny_llama_dir, tiny_tokenizer, tiny_tokenizer.encode("the cat"), 6, ignore_eos=False)
    result = generate(tiny_llama_dir, in_process, "--raw", "--max-tokens", "6", "--block-size", "8", "the cat")
    assert result.exit_code == 0, result.output
    assert expected.strip() and result.stdout == expected + "\n"


def test_generate_json_is_the_servers_chat_body(tiny_llama_dir, tiny_tokenizer, in_process):
    args = ["--system", SYSTEM["content"], "--max-tokens", "7", "--ignore-eos", "hello there"]
    streamed = generate(tiny_llama_dir, in_process, *args)
    answered = generate(tiny_llama_dir, in_process, "--json", *args)
    assert streamed.exit_code == 0 and answered.exit_code == 0, streamed.output + answered.output
    ids = chat_ids(tiny_tokenizer, [SYSTEM, {"role": "user", "content": "hello there"}])
    assert streamed.stdout == greedy_text(tiny_llama_dir, tiny_tokenizer, ids, 7) + "\n"  # the template applied
    [line] = answered.stdout.splitlines()  # the body and nothing else
    body = json.loads(line)
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == tiny_llama_dir.name
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": streamed.stdout[:-1], "refusal": None}
    assert choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == len(ids) + 7


def test_generate_raw_json_reads_stdin(tiny_llama_dir, tiny_tokenizer, in_process):
    ids = tiny_tokenizer.encode("the cat")
    result = generate(tiny_llama_dir, in_process, "--raw", "--json", "--max-tokens", "6", "--ignore-eos", "-",
                      stdin="the cat")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == greedy_text(tiny_llama_dir, tiny_tokenizer, ids, 6)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_generate_too_long_prompt_is_a_one_line_error(tiny_llama_dir, in_process):
    result = generate(tiny_llama_dir, in_process, "--max-model-len", "64", "--raw", "word " * 100)
    assert result.exit_code == 1
    assert "Error: This model's maximum context length is 64 tokens" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_raw_with_system_is_a_usage_error(tiny_llama_dir, in_process):
    result = generate(tiny_llama_dir, in_process, "--raw", "--system", "be terse", "hi")
    assert result.exit_code == 2 and "--system needs the chat template" in result.output


def chat_terminal(model_dir, *args: str) -> Terminal:
    return Terminal([*KVGATE, "chat", "--model", str(model_dir), "--temperature", "0", "--ignore-eos",
                     "--num-kv-blocks", "64", *args], timeout_s=90)


def test_chat_in_a_terminal(tiny_llama_dir, tiny_tokenizer, in_process):
    """One chat keeps the history, /reset clears it (not the system message), /exit leaves; a second (long
    replies) stops a reply at Ctrl-C and goes on, and leaves at Ctrl-C on the prompt. Both start at once."""
    short = chat_terminal(tiny_llama_dir, "--config", in_process, "--max-tokens", "8", "--max-model-len", "512",
                          "--system", SYSTEM["content"])
    # the engine core in its own process, as for a user: Ctrl-C reaches both processes, the core must go on
    # (480: even a reply stopped late leaves room for the next one in the context)
    long = chat_terminal(tiny_llama_dir, "--max-tokens", "480", "--max-model-len", "1024")
    try:
        def reply(*messages: dict) -> str:
            return greedy_text(tiny_llama_dir, tiny_tokenizer, chat_ids(tiny_tokenizer, [SYSTEM, *messages]), 8)

        first, second = {"role": "user", "content": "the cat"}, {"role": "user", "content": "and the dog?"}
        answer = reply(first)
        follow_up = reply(first, {"role": "assistant", "content": answer}, second)
        assert follow_up != reply(second)  # so matching follow_up shows that the first turn was in the prompt

        short.expect("\n> ")
        short.send("the cat\n")
        short.expect(f"the cat\n{answer}\n> ")
        short.send("and the dog?\n")
        short.expect(f"and the dog?\n{follow_up}\n> ")
        short.send("/reset\n")
        short.expect("(conversation cleared)\n> ")
        short.send("the cat\n")
        short.expect(f"the cat\n{answer}\n> ")
        short.send("/exit\n")
        assert short.wait() == 0

        long.expect("\n> ")
        for line in ("the cat", "and then?"):  # the second reply also shows the chat still works
            long.send(line + "\n")
            long.expect(line + "\n")
            long.expect_some(3)  # the reply is streaming
            long.send("\x03")
            assert long.expect("^C")  # the terminal echoes Ctrl-C after the text shown so far
            long.expect("\n> ")
        # Python's readline misses a SIGINT that lands between printing the prompt and waiting for keys
        time.sleep(0.3)
        long.send("\x03")
        assert long.wait() == 0
        assert b"Traceback" not in short.output + long.output
    finally:
        short.close()
        long.close()


def test_generate_ctrl_c_in_a_terminal(tiny_llama_dir, tiny_tokenizer, in_process):
    start = greedy_text(tiny_llama_dir, tiny_tokenizer, tiny_tokenizer.encode("the cat"), 4)
    term = Terminal([*KVGATE, "generate", "--model", str(tiny_llama_dir), "--config", in_process, "--raw",
                     "--max-tokens", "900", "--ignore-eos", "--max-model-len", "1024", "the cat"], timeout_s=90)
    try:
        term.expect(start)  # streaming
        term.send("\x03")
        assert term.wait() == 130
        assert b"Traceback" not in term.output and b"Aborted" not in term.output
    finally:
        term.close()
