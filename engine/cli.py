"""The `kvgate` command: one Click group; each package contributes its commands. Heavy imports (torch,
transformers) happen inside the commands, so `kvgate --help` answers at once."""

import logging

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(log_level: str) -> None:
    """kvgate: serve your own LLM the way the hosted APIs do."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from batch.chat import chat
    from batch.cli import batch
    from batch.generate import generate
    from bench.cli import bench
    from gateway.cli import serve

    main.add_command(batch)
    main.add_command(generate)
    main.add_command(chat)
    main.add_command(bench)
    main.add_command(serve)


_register()
