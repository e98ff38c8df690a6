"""The `kvgate` command: engine options derived from EngineConfig, and a one-off prompt."""

from __future__ import annotations

from click.testing import CliRunner

from engine.cli import main
from tests.checkpoints import hf_greedy


def test_help_lists_every_engine_option():
    result = CliRunner().invoke(main, ["generate", "--help"])
    assert result.exit_code == 0
    for flag in ("--max-num-batched-tokens", "--num-kv-blocks", "--engine-seed", "--no-enable-prefix-caching"):
        assert flag in result.output


def test_generate_prints_the_greedy_answer(tiny_llama_dir, tiny_tokenizer):
    ids = tiny_tokenizer.encode("the cat")
    tokens = hf_greedy(tiny_llama_dir, [ids], 6, ignore_eos=False)[0]
    # the answer is cut by max_tokens: a trailing half character is not printed
    expected = tiny_tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_llama_dir), "--raw", "--max-tokens", "6",
                                       "--config", "configs/default.toml", "--block-size", "8", "the cat"])
    assert result.exit_code == 0, result.output
    assert expected.strip() and result.output.rstrip("\n") == expected


def test_bad_engine_option_is_a_usage_error():
    result = CliRunner().invoke(main, ["generate", "--block-size", "12", "hi"])
    assert result.exit_code == 2
    assert "block_size must be a power of two" in result.output
