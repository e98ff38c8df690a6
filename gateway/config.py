"""ServerConfig: the gateway's own settings, beside the EngineConfig it serves; loadable from a TOML preset
(its [server] table; the [engine] table goes to EngineConfig)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import EngineConfig
from gateway.limits import OPENAI_MAX_N, OPENAI_MAX_STOP_SEQUENCES, OPENAI_MAX_TOP_LOGPROBS, ServerLimits
from gateway.tool_parsers import PARSER_NAMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # default: the model's directory or file name
    api_key: str | None = None  # required as `Authorization: Bearer` on all but /health and /metrics
    max_concurrent_requests: int = 1024  # generation requests in flight; more get 429
    retry_after_s: int = 1
    max_body_bytes: int = 16 * 2**20
    header_timeout_s: float = 10.0  # a client must send its request line and headers within this
    max_header_bytes: int = 65536  # request line and headers together; beyond, any of these three: 431
    max_headers: int = 100
    max_header_line_bytes: int = 16384
    max_connections: int = 4096  # open connections, idle keep-alive ones included; beyond: 503 and closed
    body_timeout_s: float = 30.0  # and its body within this
    keep_alive_s: float = 5.0
    graceful_shutdown_s: float = 30.0  # SIGINT/SIGTERM: in-flight requests get this long to finish
    cors_origins: list[str] = field(default_factory=list)
    # what a request may ask for (gateway/limits.py: ServerLimits); beyond, a 400 naming the field
    max_n: int = OPENAI_MAX_N  # best_of too
    max_stop_sequences: int = OPENAI_MAX_STOP_SEQUENCES
    max_top_logprobs: int = OPENAI_MAX_TOP_LOGPROBS
    tool_call_parser: str = "auto"  # how the model writes tool calls; auto: read from its chat template
    # a dead engine core is started again (gateway/restart.py): at most max_engine_restarts attempts within
    # engine_restart_window_s, waiting engine_restart_backoff_s before the first, doubling up to the max
    engine_restart: bool = True
    max_engine_restarts: int = 5
    engine_restart_window_s: float = 600.0
    engine_restart_backoff_s: float = 1.0
    engine_restart_max_backoff_s: float = 30.0
    engine_wait_s: float = 30.0  # a new request waits this long for a restarting engine, then gets a 503

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_concurrent_requests", "max_body_bytes", "retry_after_s", "max_header_bytes", "max_headers",
                     "max_header_line_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s", "graceful_shutdown_s",
                     "engine_restart_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        self._check_restart()
        if self.tool_call_parser not in PARSER_NAMES:
            raise ValueError(f"tool_call_parser must be one of {', '.join(PARSER_NAMES)}, "
                             f"got {self.tool_call_parser!r}")
        if self.api_key == "":
            raise ValueError("api_key must not be empty")
        self.limits  # built to be validated: above the engine's most is refused here

    def _check_restart(self) -> None:
        if not isinstance(self.engine_restart, bool):
            raise ValueError(f"engine_restart must be true or false, got {self.engine_restart!r}")
        if self.max_engine_restarts < 1:
            raise ValueError(f"max_engine_restarts must be >= 1 (to turn restarts off: engine_restart = false), "
                             f"got {self.max_engine_restarts}")
        for name in ("engine_restart_backoff_s", "engine_wait_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.engine_restart_max_backoff_s >= self.engine_restart_backoff_s:
            raise ValueError(f"engine_restart_max_backoff_s must be >= engine_restart_backoff_s "
                             f"({self.engine_restart_backoff_s}), got {self.engine_restart_max_backoff_s}")

    @property
    def limits(self) -> ServerLimits:
        return ServerLimits(self.max_n, self.max_stop_sequences, self.max_top_logprobs)

    @classmethod
    def from_toml(cls, path: str | Path | None, engine: EngineConfig | None = None, **overrides) -> ServerConfig:
        """The [server] table of a preset, with overrides winning; the engine config is given separately."""
        table = {}
        if path is not None:
            with open(path, "rb") as f:
                table = tomllib.load(f).get("server", {})
        known = {f.name for f in dataclasses.fields(cls)} - {"engine"}
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"unknown [server] settings in {path}: {', '.join(sorted(unknown))}")
        return cls(engine=engine or EngineConfig(), **{**table, **overrides})
