"""`kvgate generate PROMPT`: ask the model one question from the shell, the answer streamed as it comes."""

from __future__ import annotations

import sys

import click

from batch.streaming import Session, error_message, request_body, sampling_options, user_errors
from engine.cli_options import engine_options


@click.command()
@click.argument("prompt")
@click.option("--raw", is_flag=True, help="complete the prompt as is, without the chat template")
@sampling_options
@click.option("--json", "as_json", is_flag=True,
              help="print the OpenAI response body (chat.completion, or text_completion with --raw) as one line")
@engine_options
def generate(prompt, raw, system, max_tokens, temperature, sample_seed, ignore_eos, as_json, engine_config) -> None:
    """Print the model's answer to PROMPT ('-' reads it from stdin)."""
    if raw and system:
        raise click.UsageError("--system needs the chat template: leave out --raw")
    if prompt == "-":
        prompt = sys.stdin.read()
    session = None
    try:
        session = Session(engine_config)
        sampling = dict(max_tokens=max_tokens, temperature=temperature, sample_seed=sample_seed,
                        ignore_eos=ignore_eos)
        if raw:
            job = session.completion_job(request_body(session.model_name, prompt=prompt, **sampling))
        else:
            messages = ([{"role": "system", "content": system}] if system else [])
            messages.append({"role": "user", "content": prompt})
            job = session.chat_job(request_body(session.model_name, messages=messages, **sampling))
        if as_json:
            import orjson  # the encoder the gateway answers with

            click.echo(orjson.dumps(session.run(session.service.respond(job))).decode())
        else:
            session.stream(job, [])
            click.echo()
    except KeyboardInterrupt:
        # the request was aborted on the way here (Session.run); 130 is what shells report for Ctrl-C
        click.echo(err=True)
        raise click.exceptions.Exit(130) from None
    except user_errors() as exc:
        raise click.ClickException(error_message(exc)) from exc
    finally:
        if session is not None:
            session.close()
