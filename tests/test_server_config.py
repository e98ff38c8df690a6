"""ServerConfig: bad settings are refused by name (from TOML and from `kvgate serve` options) before anything
starts. The shipped defaults file: test_default_config.py."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from engine.config import EngineConfig
from gateway.config import ServerConfig
from gateway.serving import default_model_name
from kvgate.cli import main


def test_overrides_win_and_the_engine_config_is_kept(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('[server]\nport = 9000\nmax_concurrent_requests = 7\n[engine]\nmax_num_seqs = 3\n')
    engine = EngineConfig.from_toml(preset)
    config = ServerConfig.from_toml(preset, engine, port=9001)
    assert (config.port, config.max_concurrent_requests, config.engine.max_num_seqs) == (9001, 7, 3)


@pytest.mark.parametrize("setting, value", [("port", 70000), ("max_concurrent_requests", 0), ("max_body_bytes", 0),
                                            ("header_timeout_s", 0), ("body_timeout_s", -1), ("api_key", ""),
                                            ("max_engine_restarts", 0), ("engine_restart_window_s", 0),
                                            ("engine_restart_backoff_s", -1), ("engine_wait_s", -0.5),
                                            ("engine_restart_max_backoff_s", 0.5), ("engine_restart", "yes")])
def test_bad_settings_are_refused_by_name(setting, value):
    with pytest.raises(ValueError, match=setting):
        ServerConfig(**{setting: value})


def test_engine_restart_options_reach_the_config(monkeypatch):
    seen = []
    monkeypatch.setattr("gateway.server.serve", seen.append)
    args = ["serve", "--no-engine-restart", "--max-engine-restarts", "2", "--engine-restart-window-s", "60",
            "--engine-restart-backoff-s", "0.5", "--engine-wait-s", "0"]
    assert CliRunner().invoke(main, args).exit_code == 0
    [config] = seen
    assert (config.engine_restart, config.max_engine_restarts, config.engine_restart_window_s,
            config.engine_restart_backoff_s, config.engine_wait_s) == (False, 2, 60, 0.5, 0)
    assert ServerConfig().engine_restart  # on by default


def test_unknown_server_settings_are_named(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text("[server]\nprot = 1\n")
    with pytest.raises(ValueError, match="prot"):
        ServerConfig.from_toml(preset)


@pytest.mark.parametrize("args, named", [(["--port", "70000"], "port"),
                                         (["--max-concurrent-requests", "0"], "max_concurrent_requests"),
                                         (["--max-num-seqs", "0"], "max_num_seqs"),
                                         (["--max-engine-restarts", "0"], "max_engine_restarts"),
                                         (["--engine-wait-s", "-1"], "engine_wait_s")])
def test_serve_refuses_bad_options_before_starting(args, named):
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 2 and named in result.output


def test_served_model_names(tmp_path):
    assert default_model_name(None) == "SmolLM2-135M-Instruct"
    assert default_model_name("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"  # a hub id stays as it is
    (tmp_path / "my-model").mkdir()
    assert default_model_name(str(tmp_path / "my-model")) == "my-model"
    assert default_model_name(str(tmp_path / "small.Q4_1.gguf")) == "small.Q4_1"
    assert default_model_name("qwen3-0.6b") == "qwen3-0.6b"  # a shape preset by name
    assert default_model_name(str(tmp_path / "tiny.toml")) == "tiny"  # or by file
