"""`kvgate bench engine`: prefill and decode latency and throughput of the engine core by batch size, in this
process (no HTTP), like TGI's text-generation-benchmark. Writes engine.json, PNG charts and engine.html."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click

from bench.options import int_list, output_dir_option
from engine.cli_options import engine_options

DEFAULT_BATCH_SIZES = "1,2,4,8,16,32,64,128,256"


@click.command("engine")
@click.option("--batch-sizes", default=DEFAULT_BATCH_SIZES, show_default=True,
              callback=lambda ctx, param, value: int_list(value),
              help="comma-separated batch sizes, measured in this order (max_num_seqs is raised to the largest)")
@click.option("--prompt-len", type=click.IntRange(min=1), default=512, show_default=True,
              help="tokens per prompt (random token ids)")
@click.option("--decode-len", type=click.IntRange(min=1), default=256, show_default=True,
              help="decode steps after the first token")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="timed runs per batch size")
@click.option("--warmups", type=click.IntRange(min=0), default=1, show_default=True,
              help="untimed runs per batch size before the timed ones")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0: greedy")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=-1), default=0, show_default=True, help="0 or -1: no limit")
@click.option("--json-schema", type=click.File("rb"), default=None, callback=lambda c, p, v: _schema(v),
              help="a JSON schema file: every request's output is constrained to it (structured output), to measure "
                   "what the constraint costs. One the model cannot complete within --decode-len tokens keeps the "
                   "batch full")
@output_dir_option
@engine_options
def engine(batch_sizes: list[int], prompt_len: int, decode_len: int, runs: int, warmups: int, temperature: float,
           top_p: float, top_k: int, json_schema: dict | None, output_dir: str | None, engine_config) -> None:
    """Prefill and decode latency and throughput, and memory, of the engine core by batch size: B requests of
    --prompt-len random tokens each, submitted at once, then --decode-len decode steps; --runs timed runs after
    --warmups untimed ones. Writes engine.json, charts and engine.html to --output-dir (default:
    bench-engine-<time>)."""
    from bench.engine_bench import BenchSetupError, Settings, engine_config_for

    settings = Settings(batch_sizes, prompt_len, decode_len, runs, warmups, temperature, top_p, top_k,
                        json_schema=json_schema)
    try:
        config, notes = engine_config_for(engine_config, settings)
    except BenchSetupError as exc:
        raise click.BadParameter(str(exc), param_hint="--prompt-len / --decode-len / --max-model-len") from exc
    except ValueError as exc:  # the model is not found, or not supported
        raise click.ClickException(str(exc)) from exc
    out_dir = Path(output_dir or f"bench-engine-{time.strftime('%Y%m%d-%H%M%S')}")
    code = run(config, settings, notes, out_dir, model=engine_config.model)
    if code:
        raise click.exceptions.Exit(code)


def _schema(file) -> dict | None:
    """The --json-schema file's schema, refused here when it is not JSON or cannot be compiled."""
    if file is None:
        return None
    from engine.errors import InvalidRequestError
    from engine.sampling_params import StructuredOutputsParams
    from engine.structured_output import check

    try:
        schema = json.loads(file.read())
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema is an object")
        check(StructuredOutputsParams(json=schema))
    except (ValueError, InvalidRequestError) as exc:
        raise click.BadParameter(f"{file.name}: {exc}", param_hint="--json-schema") from None
    return schema


def run(config, settings, notes: list[str], out_dir: Path, model: str | None = None) -> int:
    """Measure every batch size, rewriting engine.json after each; then the charts, engine.html and the table.
    Ctrl-C stops the measurement and keeps what finished (exit code 130)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench import engine_report
    from bench.engine_bench import EngineBench
    from bench.report import header, write_json

    console = Console(stderr=True)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    doc = engine_report.document(header(config), {**dataclasses.asdict(settings), "model": model,
                                                  "output_dir": str(out_dir)}, [], None, notes)
    json_path = out_dir / "engine.json"
    current = None
    try:
        with console.status("loading the engine"):
            try:
                bench = EngineBench(config, settings)
            except ValueError as exc:  # the model does not fit, a backend that does not suit it, ...
                raise click.ClickException(f"the engine did not start: {exc}") from exc
        doc["header"]["engine_info"] = bench.info
        per_batch = settings.warmups + settings.runs
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("engine benchmark", total=per_batch * len(settings.batch_sizes))
            for current in settings.batch_sizes:
                note = bench.kv_note(current)
                if note:
                    doc["notes"].append(note)
                    console.print(f"[yellow]note:[/] {note}")

                def on_run(kind, index, times, b=current):
                    step = sum(times.decode_s) / len(times.decode_s) * 1000 if times.decode_s else float("nan")
                    progress.update(task, advance=1, description=f"batch {b}: {kind} {index + 1}: prefill "
                                    f"{times.prefill_s * 1000:.1f} ms, decode {step:.2f} ms/token")

                progress.update(task, description=f"batch {current}")
                doc["levels"].append(bench.measure(current, on_run))
                write_json(json_path, doc)
    except KeyboardInterrupt:
        where = "while the engine loaded" if current is None else f"during batch size {current}"
        doc["stopped_early"] = f"interrupted (Ctrl-C) {where}"
    write_json(json_path, doc)
    if doc["levels"]:
        engine_report.write_report(out_dir, doc)
        Console().print(engine_report.terminal_table(doc["levels"]))  # the table on stdout
    console.print(f"wrote {json_path}" + (f" and {out_dir / 'engine.html'}" if doc["levels"] else ""))
    if doc["stopped_early"]:
        console.print(f"[red]stopped early:[/] {doc['stopped_early']}")
        return 130
    return 0
