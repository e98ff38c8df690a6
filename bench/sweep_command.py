"""`kvgate bench sweep` (load levels against any OpenAI-compatible server, with charts and a report) and
`kvgate bench load` (one level; its last stdout line the JSON `kvgate bench load` has always printed)."""

from __future__ import annotations

import click

from bench.options import float_list, int_list, output_dir_option, server_options

DEFAULT_USERS = "8,16,32,64,128,256"


def _lengths(ctx, param, value):
    from bench.prompts import parse_lengths

    if value is None:
        return None
    try:
        return parse_lengths(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _positive(ctx, param, value):
    if value is not None and not value > 0:
        raise click.BadParameter(f"must be positive, got {value}")
    return value


def load_options(command):
    """The options `sweep` and `load` share (their load levels are their own)."""
    for option in reversed([
        click.option("--burstiness", default=1.0, show_default=True, callback=_positive,
                     help="open loop: shape of the gamma-distributed gaps between arrivals (1: Poisson, "
                          "<1: burstier, >1: more even)"),
        click.option("--duration", "duration_s", type=float, default=None, callback=_positive,
                     help="seconds per level during which requests are started (instead of --requests)"),
        click.option("--warmup", default=0, show_default=True, type=click.IntRange(min=0),
                     help="requests per level sent first and left out of the figures"),
        click.option("--prompt-tokens", default="512", show_default=True, callback=_lengths,
                     help="synthetic prompt length: N, uniform:MIN:MAX or normal:MEAN:STD"),
        click.option("--max-tokens", default="256", show_default=True, callback=_lengths,
                     help="output length: N, uniform:MIN:MAX or normal:MEAN:STD"),
        click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True,
                     help="send ignore_eos (the vLLM-style extension kvgate, vLLM and TGI accept) so every "
                          "request generates its max_tokens"),
        click.option("--dataset", type=click.Path(exists=True), default=None,
                     help="prompts from a JSONL file ({\"prompt\"} or {\"messages\"} lines, optional max_tokens) "
                          "or a Hugging Face dataset (saved directory or data file; ShareGPT conversations)"),
        click.option("--output-lengths", type=click.Choice(["data", "fixed"]), default="data", show_default=True,
                     help="with --dataset: output lengths from the data where it has them, or all from --max-tokens"),
        click.option("--tokenizer", type=click.Path(exists=True, file_okay=False), default=None,
                     help="count tokens locally (transformers AutoTokenizer) when the server sends no usage"),
        click.option("--seed", default=0, show_default=True, help="seed of the prompts, lengths and arrivals"),
        click.option("--slo-ttft", "slo_ttft_s", default=2.0, show_default=True, callback=_positive,
                     help="service level for goodput: time to first token, seconds"),
        click.option("--slo-tpot", "slo_tpot_ms", default=50.0, show_default=True, callback=_positive,
                     help="service level for goodput: time per output token, milliseconds"),
        click.option("--timeout", "timeout_s", default=600.0, show_default=True, callback=_positive,
                     help="seconds per request"),
        click.option("--stop-failed", default=0.10, show_default=True, type=click.FloatRange(0, 1),
                     help="saturated when more than this share of a level's requests fail"),
        click.option("--stop-ttft-growth", default=3.0, show_default=True, callback=_positive,
                     help="saturated when the TTFT p50 of a level's last quarter of requests is more than this "
                          "times its first quarter's (and above --slo-ttft)"),
        click.option("--stop-ttft-cap", "stop_ttft_cap_s", default=30.0, show_default=True, callback=_positive,
                     help="saturated when a level's TTFT p50 is above this many seconds"),
        output_dir_option,
        server_options,
    ]):
        command = option(command)
    return command


def _settings(**fields):
    from bench.sweep import SweepSettings

    try:
        return SweepSettings(**fields)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _run(settings, output_dir: str | None, progress: bool = True) -> tuple[dict, list]:
    """Run the sweep; write sweep.json after every level and the rest at the end, Ctrl-C included.
    Returns (the document, each level's records)."""
    import asyncio
    from pathlib import Path

    import aiohttp

    from bench.report import header
    from bench.sweep import Progress, new_document, run_sweep
    from bench.report import write_json
    from bench.sweep_report import RichProgress, print_table, write_outputs
    from engine.config import EngineConfig

    head = header(EngineConfig())
    head["engine_config"] = None  # the server's engine is not this machine's: see server_info
    head["device_role"] = "the machine running the load generator; the server's settings are in server_info"
    doc = new_document(settings, head)
    out = Path(output_dir) if output_dir else None
    per_level: list = []

    def on_level(doc, level, records) -> None:
        per_level.append(records)
        if out is not None:
            write_json(out / "sweep.json", doc)

    try:
        from uvloop import run as run_loop  # cheaper per chunk: the client often shares a CPU with the server
    except ImportError:
        run_loop = asyncio.run
    bars = RichProgress() if progress else Progress()
    interrupted = False
    try:
        run_loop(run_sweep(settings, doc, on_level=on_level, progress=bars))
    except KeyboardInterrupt:
        interrupted = True
        doc["stopped_early"] = f"interrupted (Ctrl-C) after {len(doc['levels'])} finished level(s)"
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        raise click.ClickException(f"cannot reach {settings.url}: {type(exc).__name__}: {exc}") from None
    except ValueError as exc:  # a dataset that cannot be read
        raise click.ClickException(str(exc)) from None
    finally:
        if hasattr(bars, "close"):
            bars.close()
    if out is not None:
        write_json(out / "sweep.json", doc)
        if doc["levels"]:
            write_outputs(out, doc, [[r.ttft for r in recs if r.ok and r.ttft is not None] for recs in per_level])
    if progress and doc["levels"]:
        print_table(doc)
    if interrupted:
        click.echo(f"interrupted: {len(doc['levels'])} finished level(s) kept"
                   + (f" in {out / 'sweep.json'}" if out else ""), err=True)
        raise click.exceptions.Exit(130)
    return doc, per_level


@click.command()
@click.option("--concurrency", callback=lambda c, p, v: None if v is None else int_list(v), default=None,
              help=f"closed-loop levels: users each waiting for their answer [default: {DEFAULT_USERS}]")
@click.option("--rate", callback=lambda c, p, v: None if v is None else float_list(v), default=None,
              help="open-loop levels instead: requests/s, arrivals on a gamma schedule (--burstiness)")
@click.option("--requests", type=click.IntRange(min=1), default=None,
              help="measured requests per level [default: 4 x concurrency; open loop: 2 minutes of arrivals]")
@load_options
def sweep(concurrency, rate, requests, output_dir, **options) -> None:
    """Load levels one after another against any OpenAI-compatible server, streaming: throughput, goodput,
    TTFT/ITL/TPOT/latency per level, an early stop at saturation; sweep.json, .csv, charts and .html in
    --output-dir."""
    if concurrency is None and rate is None:
        concurrency = int_list(DEFAULT_USERS)
    _run(_settings(concurrency=concurrency, rate=rate, requests=requests, **options), output_dir)


@click.command()
@click.option("--concurrency", type=click.IntRange(min=1), default=None,
              help="closed-loop users (requests in flight) [default: 64]")
@click.option("--rate", type=float, default=None, callback=_positive,
              help="an open-loop level instead: requests/s (gamma arrivals, --burstiness)")
@click.option("--requests", "num_requests", type=click.IntRange(min=1), default=None,
              help="requests in all, after the warm-up [default: 256 without --duration]")
@load_options
def load(concurrency, rate, num_requests, output_dir, **options) -> None:
    """Stream requests to any OpenAI-compatible server: one load level of `bench sweep`; its last stdout line
    is one JSON object (url, endpoint, model, concurrency, completed, failed, errors, output_tokens_per_s,
    ttft_s, tpot_s, itl_s, e2e_s, ...)."""
    import orjson

    from bench.levels import legacy_result
    from bench.loadgen import base_url

    if concurrency is None and rate is None:
        concurrency = 64
    if num_requests is None and options.get("duration_s") is None:
        num_requests = 256
    settings = _settings(concurrency=[concurrency] if concurrency else None, rate=[rate] if rate else None,
                         requests=num_requests, **options)
    settings.stop_failed, settings.stop_ttft_cap_s = 1.0, float("inf")  # one level: nothing to stop
    doc, per_level = _run(settings, output_dir, progress=False)
    records = per_level[0] if per_level else []
    result = legacy_result(records, url=base_url(settings.url),
                           endpoint=settings.endpoint, model=doc["header"]["model"], concurrency=concurrency,
                           num_requests=len(records))
    if rate:
        result["rate"] = rate
    level = doc["levels"][0] if doc["levels"] else {}
    result["goodput_requests_per_s"] = level.get("goodput_requests_per_s")
    click.echo(orjson.dumps(result).decode())
