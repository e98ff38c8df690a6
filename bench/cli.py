"""`kvgate bench ...`: benchmarks. Results are JSON lines on stdout."""

from __future__ import annotations

import json
import platform

import click

from engine.cli_options import engine_options


@click.group()
def bench() -> None:
    """Measure the engine (and its peers, in the same run)."""


@bench.command()
@click.option("--workload", "workloads", default="bs1,batch32", show_default=True,
              help="comma-separated: bs1, batch32")
@click.option("--backend", "backends", default="kvgate", show_default=True, help="comma-separated: kvgate, hf")
@click.option("--repeats", default=2, show_default=True, help="timed runs per workload; the best is kept")
@engine_options
def offline(workloads: str, backends: str, repeats: int, engine_config) -> None:
    """Throughput of LLM.generate, and of transformers generate on the same weights for comparison."""
    from bench.offline import run_hf, run_kvgate
    from bench.workloads import WORKLOADS
    from engine.model_source import resolve_model

    model_dir = str(resolve_model(engine_config.model, engine_config.load_format))
    for name in workloads.split(","):
        if name not in WORKLOADS:
            raise click.BadParameter(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
        for backend in backends.split(","):
            if backend == "kvgate":
                result = run_kvgate(engine_config, WORKLOADS[name], repeats)
            elif backend == "hf":
                result = run_hf(model_dir, WORKLOADS[name], repeats)
            else:
                raise click.BadParameter(f"unknown backend {backend!r}; known: kvgate, hf")
            result["model"] = engine_config.model or "SmolLM2-135M-Instruct (default)"
            result["machine"] = platform.processor() or platform.machine()
            click.echo(json.dumps(result))
