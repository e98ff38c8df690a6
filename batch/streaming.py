"""What `kvgate generate` and `kvgate chat` share: their sampling options, requests built and validated by the
gateway's Service (the same checks and messages as the server), replies streamed to the terminal, and Ctrl-C
turned into aborting the request in flight."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable

import click


def sampling_options(command):
    """--system, --max-tokens, --temperature, --seed and the hidden --ignore-eos (tests and benchmarks want long
    replies from models that stop early)."""
    for option in reversed([
        click.option("--system", default=None, help="a system message to put first"),
        click.option("--max-tokens", type=int, default=256, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True),
        click.option("--seed", "sample_seed", type=int, default=None, help="sampling seed"),
        click.option("--ignore-eos", is_flag=True, hidden=True),
    ]):
        command = option(command)
    return command


def request_body(model_name: str, max_tokens: int, temperature: float, sample_seed: int | None,
                 ignore_eos: bool, **fields) -> dict:
    """An OpenAI request body with the command's sampling options (and messages or prompt in `fields`)."""
    body = {"model": model_name, "max_tokens": max_tokens, "temperature": temperature, **fields}
    if sample_seed is not None:
        body["seed"] = sample_seed
    if ignore_eos:
        body["ignore_eos"] = True
    return body


class Session:
    """One engine, its Service, and one long-lived event loop (an AsyncLLM serves the loop it first ran in)."""

    def __init__(self, engine_config) -> None:
        from engine.llm import AsyncLLM
        from gateway.serving import Service, default_model_name

        self.engine = AsyncLLM(config=engine_config)
        self.loop = asyncio.new_event_loop()
        self.model_name = default_model_name(engine_config.model)
        self.service = Service(self.engine, [self.model_name])

    def chat_job(self, body: dict):
        import msgspec

        from gateway.schemas import ChatCompletionRequest

        return self.service.chat_job(msgspec.convert(body, ChatCompletionRequest))

    def completion_job(self, body: dict):
        import msgspec

        from gateway.schemas import CompletionRequest

        return self.service.completion_job(msgspec.convert(body, CompletionRequest))

    def stream(self, job, shown: list[str]) -> None:
        """Print the reply piece by piece as it arrives; `shown` collects the pieces, so a caller interrupted
        by Ctrl-C (KeyboardInterrupt, the request aborted) still knows what the user saw."""

        async def run() -> None:
            async for out in self.engine.generate(job.prompts[0], delta=True):
                if piece := out.outputs[0].text:
                    sys.stdout.write(piece)
                    sys.stdout.flush()  # stdout is block-buffered when piped: show each piece as it comes
                    shown.append(piece)

        self.run(run())

    def run(self, coro):
        """Run `coro` on the session's loop. Ctrl-C cancels it, which closes its `async for` over
        engine.generate (aborting the request), then raises KeyboardInterrupt once it has unwound. The loop's
        own handler (rather than the default KeyboardInterrupt thrown at whatever line runs) can never stop the
        engine's bookkeeping halfway, and its wakeup fd makes a signal that lands just before select() count."""
        task = self.loop.create_task(coro)
        interrupted = False

        def on_sigint() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        installed = _add_sigint_handler(self.loop, on_sigint)
        try:
            return self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            if interrupted:
                raise KeyboardInterrupt from None
            raise
        finally:
            if installed:
                self.loop.remove_signal_handler(signal.SIGINT)  # back to the default KeyboardInterrupt
            if not task.done():  # KeyboardInterrupt from the default handler (no loop handler here): abort too
                task.cancel()
                with contextlib.suppress(BaseException):
                    self.loop.run_until_complete(task)

    def close(self) -> None:
        self.engine.shutdown()
        self.loop.close()


def _add_sigint_handler(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> bool:
    try:
        loop.add_signal_handler(signal.SIGINT, callback)
    except (NotImplementedError, RuntimeError, ValueError):  # not Unix, or not the main thread
        return False
    return True


def error_message(exc: BaseException) -> str:
    """The message the server would answer a bad request with (its OpenAI error body's message)."""
    from gateway.errors import from_exception

    return from_exception(exc).message


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's fault (bad request, prompt too long) or an engine that died: reported as a
    message, never a traceback."""
    from engine.errors import EngineDeadError
    from gateway.errors import APIError

    return ValueError, APIError, EngineDeadError
