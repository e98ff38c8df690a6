"""One `kvgate batch run`: check the input, start the engine, run the records, report progress and a summary."""

from __future__ import annotations

import asyncio
import sys
import time

from batch.outputs import OutputFile, answered_ids, openai_line, put_in_order, simple_line
from batch.runner import BatchRunner, Summary
from batch.source import count_unique, open_source, parse_shard
from engine.config import EngineConfig

_LOG_EVERY_S = 10.0


class BatchJob:
    def __init__(self, input_path: str | None, output: str, *, fmt: str = "auto", output_format: str = "openai",
                 dataset: str | None = None, split: str = "train", prompt_column: str | None = None,
                 messages_column: str | None = None, resume: bool = False, shard: str | None = None,
                 strict_model: bool = False, max_in_flight: int | None = None, defaults: dict | None = None,
                 engine_config: EngineConfig | None = None, engine_factory=None) -> None:
        if resume and output == "-":
            raise ValueError("--resume needs an output file, not stdout")
        self.source = open_source(input_path, fmt, parse_shard(shard), dataset, split, prompt_column,
                                  messages_column)
        self.output, self.output_format, self.resume = output, output_format, resume
        self.strict_model, self.defaults = strict_model, defaults or {}
        self.engine_config = engine_config or EngineConfig()
        self.max_in_flight = max_in_flight or 2 * self.engine_config.max_num_seqs
        self.engine_factory = engine_factory

    def run(self) -> Summary:
        try:
            total = count_unique(self.source.records())  # before any work: duplicate ids are named now
            done = answered_ids(self.output) if self.resume else set()
            summary = asyncio.run(self._run(total, done))
            if done:  # the new lines were appended after the old ones
                put_in_order(self.output, (r.custom_id for r in self.source.records()))
            return summary
        finally:
            self.source.cleanup()

    async def _run(self, total: int, done: set[str]) -> Summary:
        from engine.llm import AsyncLLM
        from gateway.serving import Service, default_model_name

        factory = self.engine_factory or (lambda: AsyncLLM(config=self.engine_config))
        engine = await asyncio.to_thread(factory)
        out = OutputFile(self.output, append=self.resume)
        progress = _Progress(total - len(done))
        try:
            name = default_model_name(self.engine_config.model)
            service = Service(engine, [name], strict_model=self.strict_model)
            runner = BatchRunner(service, openai_line if self.output_format == "openai" else simple_line,
                                 self.defaults, self.max_in_flight)
            todo = (r for r in self.source.records() if r.custom_id not in done)
            return await runner.run(todo, out, progress.update)
        finally:
            progress.close()
            out.close()
            engine.shutdown()


class _Progress:
    """A bar (lines, lines/s, output tokens/s, ETA) on a terminal; a log line every few seconds otherwise."""

    def __init__(self, total: int) -> None:
        self.total, self.start, self.last_log = total, time.monotonic(), time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="line", desc="batch", file=sys.stderr)

    def update(self, summary: Summary) -> None:
        now = time.monotonic()
        rate = summary.completion_tokens / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        elif now - self.last_log >= _LOG_EVERY_S:
            self.last_log = now
            lines_s = summary.lines / (now - self.start)
            eta = (self.total - summary.lines) / lines_s if lines_s else float("inf")
            print(f"kvgate batch: {summary.lines}/{self.total} lines, {lines_s:.2f} lines/s, {rate:,.0f} output "
                  f"tokens/s, ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
