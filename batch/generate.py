"""`kvgate generate PROMPT`: ask the model one question from the shell."""

from __future__ import annotations

import sys

import click

from engine.cli_options import engine_options


@click.command()
@click.argument("prompt")
@click.option("--system", default=None, help="a system message to put first")
@click.option("--raw", is_flag=True, help="send the prompt as is, without the chat template")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--seed", "sample_seed", type=int, default=None)
@engine_options
def generate(prompt, system, raw, max_tokens, temperature, sample_seed, engine_config) -> None:
    """Print the model's answer to PROMPT ('-' reads it from stdin)."""
    from engine import LLM, SamplingParams

    if prompt == "-":
        prompt = sys.stdin.read()
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=sample_seed)
        with LLM(config=engine_config) as llm:
            if raw:
                out = llm.generate(prompt, params, use_tqdm=False)
            else:
                messages = ([{"role": "system", "content": system}] if system else [])
                out = llm.chat(messages + [{"role": "user", "content": prompt}], params, use_tqdm=False)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(out[0].outputs[0].text)
