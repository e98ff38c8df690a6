"""Options shared by the benchmark family (`bench engine`, `bench sweep`, `bench load`, `capacity`), so each is
spelled and documented once."""

from __future__ import annotations

import click


def int_list(text: str) -> list[int]:
    """`1,2,4,8` -> [1, 2, 4, 8] (positive integers)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    """`0.5,1,2` -> [0.5, 1.0, 2.0] (positive numbers)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise click.BadParameter(f"expected positive numbers, got {text!r}")
    return values


def output_dir_option(command):
    return click.option("--output-dir", type=click.Path(file_okay=False), default=None,
                        help="write the JSON result, the charts (PNG) and the HTML report here")(command)


def server_options(command):
    """--url, --api-key, --model, --endpoint: which OpenAI-compatible server and how to ask it."""
    for option in reversed([
        click.option("--url", default="http://127.0.0.1:8000", show_default=True,
                     help="the server's base URL, with or without /v1"),
        click.option("--api-key", envvar="KVGATE_API_KEY", default=None, help="bearer token [env: KVGATE_API_KEY]"),
        click.option("--model", default=None, help="model id to request (default: the first /v1/models lists)"),
        click.option("--endpoint", type=click.Choice(["completions", "chat"]), default="completions",
                     show_default=True, help="/v1/completions or /v1/chat/completions, streamed"),
    ]):
        command = option(command)
    return command
