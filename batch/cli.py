"""`kvgate batch run` and `kvgate batch merge`: JSONL files and datasets through the engine."""

from __future__ import annotations

import sys

import click

from engine.cli_options import engine_options


@click.group()
def batch() -> None:
    """Run a file of requests offline (OpenAI Batch JSONL, plain JSONL or a Hugging Face dataset)."""


@batch.command()
@click.argument("input_path", metavar="INPUT", required=False)
@click.option("-o", "--output", required=True, help="output JSONL ('-': stdout)")
@click.option("--format", "fmt", type=click.Choice(["auto", "openai", "jsonl"]), default="auto", show_default=True)
@click.option("--output-format", type=click.Choice(["openai", "simple"]), default="openai", show_default=True)
@click.option("--dataset", default=None, help="a Hugging Face dataset: hub name, saved directory or data file")
@click.option("--split", default="train", show_default=True)
@click.option("--prompt-column", default=None, help="dataset column holding prompts (default: prompt)")
@click.option("--messages-column", default=None, help="dataset column holding chat messages")
@click.option("--resume", is_flag=True, help="skip the custom_ids already in the output; append the rest")
@click.option("--shard", default=None, help="K/N: run every N-th line starting at the K-th (1-based)")
@click.option("--strict-model", is_flag=True, help="a line naming another model fails with model_not_found")
@click.option("--max-in-flight", type=click.IntRange(min=1), default=None,
              help="lines submitted at once (default: 2 x max_num_seqs)")
@click.option("--max-tokens", type=int, default=None, help="default for lines that do not say")
@click.option("--temperature", type=float, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--top-k", type=int, default=None)
@click.option("--seed", "sample_seed", type=int, default=None)
@click.option("--stop", multiple=True, help="a stop string (repeat for several)")
@click.option("--presence-penalty", type=float, default=None)
@click.option("--frequency-penalty", type=float, default=None)
@click.option("--ignore-eos", is_flag=True, default=None)
@engine_options
def run(input_path, output, fmt, output_format, dataset, split, prompt_column, messages_column, resume, shard,
        strict_model, max_in_flight, sample_seed, stop, engine_config, **sampling) -> None:
    """Answer every line of INPUT ('-': stdin) into OUTPUT, one line each, in input order. Exit status 1 when
    some lines failed (they are error lines in the output)."""
    from batch.job import BatchJob

    if (input_path is None) == (dataset is None):
        raise click.UsageError("give INPUT or --dataset (exactly one)")
    defaults = {k: v for k, v in sampling.items() if v is not None}
    if sample_seed is not None:
        defaults["seed"] = sample_seed
    if stop:
        defaults["stop"] = list(stop)
    try:
        job = BatchJob(input_path, output, fmt=fmt, output_format=output_format, dataset=dataset, split=split,
                       prompt_column=prompt_column, messages_column=messages_column, resume=resume, shard=shard,
                       strict_model=strict_model, max_in_flight=max_in_flight, defaults=defaults,
                       engine_config=engine_config)
        summary = job.run()
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"kvgate batch: {summary.text()}", err=True)
    sys.exit(1 if summary.failed else 0)


@batch.command()
@click.argument("shards", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="the merged output JSONL")
def merge(shards, output) -> None:
    """Join the outputs of --shard 1/N ... N/N (given in that order) into one file in input order."""
    from batch.merge import merge_shards

    try:
        count = merge_shards(list(shards), output)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"kvgate batch merge: {count} lines from {len(shards)} shards into {output}", err=True)
