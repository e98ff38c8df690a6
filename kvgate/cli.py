"""The `kvgate` command: one Click group to which each package contributes its commands. Those modules import
only Click at the top (torch and transformers load inside the commands), so `kvgate --help` answers at once."""

import logging

import click

from batch.chat import chat
from batch.cli import batch
from batch.generate import generate
from bench.capacity_command import capacity
from bench.cli import bench
from gateway.cli import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(log_level: str) -> None:
    """kvgate: serve your own LLM the way the hosted APIs do."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for command in (batch, generate, chat, bench, capacity, serve):
    main.add_command(command)
