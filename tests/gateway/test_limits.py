"""The request limits without a server: ServerConfig's limits are validated against the engine's (from Python, a
preset and `kvgate serve`), and errors are mapped to the field they name, never to a guessed one."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from engine.errors import ContextTooLongError, InvalidRequestError
from engine.sampling_params import MAX_LOGPROBS, MAX_N
from gateway.config import ServerConfig
from gateway.errors import from_exception
from gateway.params import chat_param
from gateway.schemas import ChatCompletionRequest, Message

from kvgate.cli import main


@pytest.mark.parametrize("setting, bad, edge", [
    ("max_n", MAX_N + 1, MAX_N), ("max_n", 0, 1), ("max_top_logprobs", MAX_LOGPROBS + 1, MAX_LOGPROBS),
    ("max_top_logprobs", -1, 0), ("max_stop_sequences", -1, 0), ("max_n", 2.0, 2), ("max_n", True, 1),
])
def test_limits_are_validated(setting, bad, edge):
    with pytest.raises(ValueError, match=setting):
        ServerConfig(**{setting: bad})
    assert getattr(ServerConfig(**{setting: edge}).limits, setting) == edge


def test_limits_from_a_preset(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text("[server]\nmax_n = 8\nmax_stop_sequences = 16\nmax_top_logprobs = 5\n")
    limits = ServerConfig.from_toml(preset).limits
    assert (limits.max_n, limits.max_best_of, limits.max_stop_sequences, limits.max_top_logprobs) == (8, 8, 16, 5)


@pytest.mark.parametrize("line, named", [(f"max_n = {MAX_N + 1}", "max_n"),
                                         (f"max_top_logprobs = {MAX_LOGPROBS + 1}", "max_top_logprobs"),
                                         ("max_stop_sequences = -1", "max_stop_sequences")])
def test_serve_refuses_limits_above_the_engine(tmp_path, line, named):
    preset = tmp_path / "p.toml"
    preset.write_text(f"[server]\n{line}\n")
    result = CliRunner().invoke(main, ["serve", "--config", str(preset)])
    assert result.exit_code == 2 and named in result.output, result.output


def test_errors_name_the_field_they_carry():
    assert from_exception(InvalidRequestError("top_k must be an integer", param="top_k")).param == "top_k"
    error = from_exception(ContextTooLongError("too long", param="prompt"))
    assert (error.status, error.param, error.code) == (400, "prompt", "context_length_exceeded")
    # a plain ValueError names no field: its first word is not one ("temperature" here would be a guess)
    error = from_exception(ValueError("temperature of the room is irrelevant"))
    assert (error.status, error.param) == (400, None)


def test_chat_requests_name_their_own_fields():
    base = {"model": "m", "messages": [Message(role="user", content="hi")]}
    req = ChatCompletionRequest(**base)
    assert [chat_param(req, p) for p in ("prompt", "logprobs", "max_tokens", "top_k", None)] == \
        ["messages", "top_logprobs", "max_tokens", "top_k", None]
    assert chat_param(ChatCompletionRequest(**base, max_completion_tokens=5), "max_tokens") == "max_completion_tokens"
