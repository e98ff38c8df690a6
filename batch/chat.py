"""`kvgate chat`: a multi-turn conversation in the terminal, each reply streamed as it comes."""

from __future__ import annotations

import sys

import click

from batch.streaming import Session, error_message, request_body, sampling_options, user_errors
from engine.cli_options import engine_options
from engine.errors import ContextTooLongError

PROMPT = "> "
HELP = "/reset clears the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops a reply."


@click.command()
@sampling_options
@engine_options
def chat(system, max_tokens, temperature, sample_seed, ignore_eos, engine_config) -> None:
    """Talk with the model: the whole conversation goes to the chat template at every turn."""
    prompt = ""  # piped input: the replies alone, one a line
    if sys.stdin.isatty():
        prompt = PROMPT
        try:
            import readline  # noqa: F401  (line editing and history for input(); absent on some platforms)
        except ImportError:
            pass
    try:
        session = Session(engine_config)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None
    except user_errors() as exc:
        raise click.ClickException(error_message(exc)) from exc
    sampling = dict(max_tokens=max_tokens, temperature=temperature, sample_seed=sample_seed, ignore_eos=ignore_eos)
    first = [{"role": "system", "content": system}] if system else []
    history: list[dict] = []
    click.echo(f"kvgate chat with {session.model_name}. {HELP}", err=True)
    try:
        while True:
            try:
                line = input(prompt).strip()
            except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: leave
                click.echo()
                return
            if line == "/exit":
                return
            if line == "/reset":
                history.clear()  # the system message is kept: it lives in `first`
                click.echo("(conversation cleared)", err=True)
                continue
            if line:
                history.extend(_turn(session, first + history, line, sampling))
    finally:
        session.close()


def _turn(session: Session, before: list[dict], line: str, sampling: dict) -> list[dict]:
    """Ask `line` after the messages `before`; the turn's messages to keep in the history."""
    question = {"role": "user", "content": line}
    shown: list[str] = []
    try:
        job = session.chat_job(request_body(session.model_name, messages=before + [question], **sampling))
        session.stream(job, shown)
    except KeyboardInterrupt:
        # Ctrl-C stopped the reply (the request is aborted). What was shown stays as the assistant's turn, so
        # the next answer follows the text the user actually read; a reply stopped before any text is dropped
        # along with its question.
        click.echo()
        return [question, {"role": "assistant", "content": "".join(shown)}] if shown else []
    except user_errors() as exc:  # e.g. the conversation outgrew the context: say so, keep chatting
        if not session.engine.is_running:
            raise click.ClickException(error_message(exc)) from exc
        hint = " (/reset starts over)" if isinstance(exc, ContextTooLongError) else ""
        click.echo(("\n" if shown else "") + f"error: {error_message(exc)}{hint}", err=True)
        return []
    click.echo()
    return [question, {"role": "assistant", "content": "".join(shown)}]
