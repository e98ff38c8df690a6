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
@click.option("--backend", "backends", default="kvgate", show_default=True,
              help="comma-separated: kvgate (LLM.generate), batch (kvgate batch run's runner), hf")
@click.option("--repeats", default=2, show_default=True, help="timed runs per workload; the best is kept")
@engine_options
def offline(workloads: str, backends: str, repeats: int, engine_config) -> None:
    """Throughput of LLM.generate, and of transformers generate on the same weights for comparison."""
    from bench.offline import run_batch, run_hf, run_kvgate
    from bench.workloads import WORKLOADS
    from engine.model_source import resolve_model

    model_dir = str(resolve_model(engine_config.model, engine_config.load_format))
    for name in workloads.split(","):
        if name not in WORKLOADS:
            raise click.BadParameter(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
        for backend in backends.split(","):
            if backend == "kvgate":
                result = run_kvgate(engine_config, WORKLOADS[name], repeats)
            elif backend == "batch":
                result = run_batch(engine_config, WORKLOADS[name], repeats)
            elif backend == "hf":
                result = run_hf(model_dir, WORKLOADS[name], repeats)
            else:
                raise click.BadParameter(f"unknown backend {backend!r}; known: kvgate, batch, hf")
            result["model"] = engine_config.model or "SmolLM2-135M-Instruct (default)"
            result["machine"] = platform.processor() or platform.machine()
            click.echo(json.dumps(result))


@bench.command()
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="server base, with or without /v1")
@click.option("--concurrency", default=64, show_default=True, help="closed-loop workers (requests in flight)")
@click.option("--requests", "num_requests", default=256, show_default=True, help="requests in all")
@click.option("--endpoint", type=click.Choice(["completions", "chat"]), default="completions", show_default=True)
@click.option("--model", default=None, help="model id; default: the first one /v1/models lists")
@click.option("--prompt-tokens", default=512, show_default=True, help="length of the generated random prompts")
@click.option("--max-tokens", default=256, show_default=True)
@click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True,
              help="send ignore_eos (vLLM-style extension) so every request generates max_tokens")
@click.option("--api-key", envvar="KVGATE_API_KEY", default=None, help="bearer token [env: KVGATE_API_KEY]")
@click.option("--timeout", "timeout_s", default=600.0, show_default=True, help="seconds per request")
def load(url: str, concurrency: int, num_requests: int, endpoint: str, model: str | None, prompt_tokens: int,
         max_tokens: int, ignore_eos: bool, api_key: str | None, timeout_s: float) -> None:
    """Stream requests to any OpenAI-compatible server; print latency and throughput as one JSON line."""
    import orjson

    from bench.loadgen import run_load

    try:  # uvloop's loop is cheaper per chunk: the client shares the CPU with the server under test
        from uvloop import run as run_loop
    except ImportError:
        from asyncio import run as run_loop
    result = run_loop(run_load(url, concurrency=concurrency, num_requests=num_requests, endpoint=endpoint,
                               model=model, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                               ignore_eos=ignore_eos, api_key=api_key, timeout_s=timeout_s))
    click.echo(orjson.dumps(result).decode())


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
