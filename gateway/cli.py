"""`kvgate serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import click

from engine.cli_options import engine_options
from gateway.tool_parsers import PARSER_NAMES


@click.command()
@click.option("--host", default=None, help="default: 127.0.0.1")
@click.option("--port", type=int, default=None, help="default: 8000 (0: any free port, printed when ready)")
@click.option("--served-model-name", default=None, help="the model name clients send (default: the model's name)")
@click.option("--api-key", envvar="KVGATE_API_KEY", default=None,
              help="require `Authorization: Bearer KEY` (env KVGATE_API_KEY); /health and /metrics stay open")
@click.option("--max-concurrent-requests", type=int, default=None, help="beyond this, 429 (default: 1024)")
@click.option("--graceful-shutdown-s", type=float, default=None, help="time in-flight requests get on SIGTERM")
@click.option("--cors-origin", "cors_origins", multiple=True, help="allow browser calls from this origin (repeat)")
@click.option("--tool-call-parser", type=click.Choice(PARSER_NAMES), default=None,
              help="how the model writes tool calls (default: auto, read from its chat template)")
@click.option("--engine-restart/--no-engine-restart", default=None,
              help="start a dead engine core again (default: on)")
@click.option("--max-engine-restarts", type=int, default=None,
              help="restart attempts allowed within --engine-restart-window-s; past them it stays dead (default: 5)")
@click.option("--engine-restart-window-s", type=float, default=None, help="default: 600")
@click.option("--engine-restart-backoff-s", type=float, default=None,
              help="wait before the first restart in the window, doubling with each (default: 1, at most 30)")
@click.option("--engine-wait-s", type=float, default=None,
              help="how long a new request waits for a restarting engine before a 503 (default: 30)")
@engine_options
def serve(engine_config, config_path=None, **options) -> None:
    """Serve the model over OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models) until stopped."""
    from gateway.config import ServerConfig
    from gateway.server import serve as run

    given = {k: v for k, v in options.items() if v not in (None, ())}
    try:
        config = ServerConfig.from_toml(config_path, engine_config, **given)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    run(config)
