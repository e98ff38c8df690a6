"""`kvgate bench ...`: benchmarks. `offline`, `serve` and `gateway` print JSON lines; `engine` and `sweep` (and
`load`, a sweep of one level) write a result document, charts and an HTML report too (their own modules)."""

from __future__ import annotations

import json
import logging

import click

from bench.engine_command import engine
from bench.soak_command import soak
from bench.sweep_command import load, sweep
from engine.cli_options import engine_options


@click.group()
def bench() -> None:
    """Measure the engine (and its peers, in the same run)."""


@bench.command()
@click.option("--workload", "workloads", default="bs1,batch32", show_default=True,
              help="comma-separated: nano, nano-fixed, bs1, ttft-8k, batch32 (docs/workloads.md)")
@click.option("--backend", "backends", default="kvgate", show_default=True,
              help="comma-separated: kvgate (LLM.generate), batch (kvgate batch run's runner), hf (transformers)")
@click.option("--repeats", default=1, show_default=True,
              help="timed calls per workload after the warm-up; the fastest is kept (ttft: the median of 5 or more)")
@click.option("--output", "output", type=click.Path(dir_okay=False), default=None,
              help="also write every result, under a header (device, versions, engine config, command), as one "
                   "JSON document; rewritten after each result")
@engine_options
def offline(workloads: str, backends: str, repeats: int, output: str | None, engine_config) -> None:
    """Throughput of LLM.generate, and of transformers on the same model shape and prompts, as JSON lines."""
    from bench.offline import run_batch, run_hf, run_kvgate
    from bench.report import header, write_report
    from bench.workloads import WORKLOADS

    runners = {"kvgate": run_kvgate, "batch": run_batch, "hf": run_hf}
    names, chosen = workloads.split(","), backends.split(",")
    for name in names:
        if name not in WORKLOADS:
            raise click.BadParameter(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}",
                                     param_hint="--workload")
    for backend in chosen:
        if backend not in runners:
            raise click.BadParameter(f"unknown backend {backend!r}; known: {', '.join(runners)}",
                                     param_hint="--backend")
    head, results = header(engine_config), []
    for name in names:
        for backend in chosen:
            try:
                result = runners[backend](engine_config, WORKLOADS[name], repeats)
            except Exception as exc:  # e.g. ttft-8k past the model's context: the other runs still go on
                logging.getLogger("kvgate").exception("bench offline: %s on %s failed", name, backend)
                result = {"backend": backend, "workload": name, "error": f"{type(exc).__name__}: {exc}"}
            result["model"] = engine_config.model or "SmolLM2-135M-Instruct (default)"
            result["device"] = head["device"]
            results.append(result)
            click.echo(json.dumps(result))
            if output:
                write_report(output, head, results)
    failed = [f"{r['workload']}/{r['backend']}" for r in results if "error" in r]
    if failed:
        raise click.ClickException(f"{len(failed)} run(s) failed: {', '.join(failed)} (see their \"error\")")


@bench.command()
@click.option("--concurrency", default=256, show_default=True, help="streaming clients")
@click.option("--requests", "num_requests", default=1024, show_default=True)
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--prompt-tokens", default=32, show_default=True)
@click.option("--port", default=8123, show_default=True)
@click.option("--model", default=None, help="whose tokenizer the fake engine uses (default: the embedded model)")
@click.option("--step-ms", default=0.0, show_default=True,
              help="pace the fake engine to a step every N ms (0: tokens at once)")
def gateway(concurrency: int, num_requests: int, max_tokens: int, prompt_tokens: int, port: int,
            model: str | None, step_ms: float) -> None:
    """The gateway's own ceiling: kvgate serve over a fake engine that emits tokens at once, loaded by
    `kvgate bench load` in another process."""
    from bench.gateway_speed import run

    click.echo(json.dumps(run(concurrency, num_requests, max_tokens, prompt_tokens, port, model, step_ms)))


@bench.command()
@click.option("--concurrency", default=64, show_default=True, help="streaming clients, one request each")
@click.option("--prompt-tokens", default=512, show_default=True)
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--port", default=8124, show_default=True)
@engine_options
def serve(concurrency: int, prompt_tokens: int, max_tokens: int, port: int, engine_config) -> None:
    """serve-N: output tokens/s of `kvgate serve` under N streaming clients against LLM.generate on the same
    requests; one JSON line."""
    from bench.serve_speed import run

    click.echo(json.dumps(run(engine_config, concurrency, prompt_tokens, max_tokens, port)))


for command in (engine, sweep, load, soak):
    bench.add_command(command)
