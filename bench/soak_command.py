"""`kvgate bench soak`: start `kvgate serve` with the given engine, keep it saturated by streaming clients for a
while (some leaving mid-stream), sample its memory and state, and check that nothing was left behind. Writes
soak.json and three charts (server memory, device memory, load) to --output-dir."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from bench.options import output_dir_option
from bench.sweep_command import _lengths
from engine.cli_options import engine_options

GIB = 2**30


@click.command("soak")
@click.option("--clients", type=click.IntRange(min=1), default=256, show_default=True,
              help="streaming clients, each sending its next request when its last one ended")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0, min_open=True), default=600.0,
              show_default=True, help="seconds during which requests are started")
@click.option("--abort-fraction", type=click.FloatRange(0.0, 1.0), default=0.1, show_default=True,
              help="fraction of the requests whose client leaves mid-stream, after a random number of tokens")
@click.option("--prompt-tokens", default="uniform:64:1024", show_default=True, callback=_lengths,
              help="prompt length (random token ids): N, uniform:MIN:MAX or normal:MEAN:STD")
@click.option("--max-tokens", default="uniform:16:512", show_default=True, callback=_lengths,
              help="output length (ignore_eos): N, uniform:MIN:MAX or normal:MEAN:STD")
@click.option("--sample-every", "sample_every_s", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="seconds between samples of memory and metrics")
@click.option("--warmup", "warmup_s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="seconds of load after which memory must stay flat (samples before are the warm-up)")
@click.option("--seed", "load_seed", default=0, show_default=True, help="seed of the prompts, lengths and aborts")
@click.option("--port", default=8125, show_default=True)
@output_dir_option
@engine_options
def soak(clients: int, duration_s: float, abort_fraction: float, prompt_tokens, max_tokens, sample_every_s: float,
         warmup_s: float, load_seed: int, port: int, output_dir: str | None, engine_config) -> None:
    """A saturation soak of `kvgate serve`: afterwards no error but the clients' own aborts, no 5xx, nothing
    running and no KV block held; memory after the warm-up is reported (first, last, min, max). Exits 1 when
    anything was left behind or failed."""
    from bench.report import header
    from bench.soak import SoakSettings, run

    settings = SoakSettings(clients, duration_s, abort_fraction, prompt_tokens, max_tokens, sample_every_s,
                            warmup_s, load_seed, port)
    out = Path(output_dir or time.strftime("bench-soak-%Y%m%d-%H%M%S"))
    doc = {"header": header(engine_config), "settings": settings.as_dict(), **run(engine_config, settings, _echo)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(doc, indent=2))
    write_charts(out, doc)
    click.echo(json.dumps(doc["summary"]))
    problems = problems_of(doc["summary"])
    if problems:
        raise click.ClickException(f"the soak left problems: {'; '.join(problems)} (see {out / 'soak.json'})")


def _echo(sample: dict) -> None:
    rss, device = sample["server_rss_bytes"], sample["device_memory_bytes"]
    click.echo(f"t={sample['t_s']:.0f}s running={sample['running']:.0f} waiting={sample['waiting']:.0f} "
               f"kv={sample['kv_cache_usage']:.3f} done={sample['requests_done']} "
               f"rss={rss / GIB if rss else 0:.2f}GiB device={device / GIB if device else 0:.2f}GiB", err=True)


def problems_of(summary: dict) -> list[str]:
    found = []
    if summary["errors"]:
        found.append(f"errors {summary['errors']}")
    if summary["http_5xx"]:
        found.append(f"{summary['http_5xx']:.0f} 5xx responses")
    for key in ("kv_cache_usage_at_end", "running_at_end", "waiting_at_end"):
        if summary[key]:
            found.append(f"{key} = {summary[key]}")
    if summary.get("server_errors_logged"):
        found.append(f"{summary['server_errors_logged']} error lines in the server's log")
    return found


def write_charts(out: Path, doc: dict) -> None:
    from bench.charts import lines

    samples = doc["samples"]
    minutes = [x["t_s"] / 60 for x in samples]

    def gib(key):
        return [x[key] / GIB if x[key] is not None else None for x in samples]

    model = doc.get("model", "")
    lines(out / "soak-server-memory.png", minutes, {"gateway + engine core RSS": gib("server_rss_bytes")},
          title=f"Server memory under the soak ({model})", xlabel="minutes", ylabel="GiB")
    lines(out / "soak-device-memory.png", minutes, {"device memory in use": gib("device_memory_bytes")},
          title=f"Device memory under the soak ({model})", xlabel="minutes", ylabel="GiB")
    lines(out / "soak-load.png", minutes,
          {"running": [x["running"] for x in samples], "waiting": [x["waiting"] for x in samples],
           "KV usage (%)": [100 * x["kv_cache_usage"] for x in samples]},
          title="Load under the soak", xlabel="minutes", ylabel="requests / percent")
