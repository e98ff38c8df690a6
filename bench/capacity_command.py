"""`kvgate capacity`: how many GPUs an organisation needs, and how many people N GPUs serve, from a measured load
sweep (docs/capacity.md). The arithmetic is bench/capacity.py, the simulation bench/capacity_sim.py, the telling
bench/capacity_report.py; this module reads the options and puts the steps together."""

from __future__ import annotations

import sys
import time

import click

from bench.options import int_list, output_dir_option, server_options

SWEEP_LEVELS = "1,2,4,8,16,32,64,128"


def _share(name: str, *, zero: bool = True, one: bool = True):
    def check(ctx, param, value):
        if value is None:
            return value
        low_ok = value >= 0 if zero else value > 0
        high_ok = value <= 1 if one else value < 1
        if not (low_ok and high_ok):
            bounds = f"{'[' if zero else '('}0, 1{']' if one else ')'}"
            raise click.BadParameter(f"{name} is a share in {bounds} (0.1 is 10%), got {value:g}")
        return value
    return check


def _positive(name: str):
    def check(ctx, param, value):
        if value is not None and not value > 0:
            raise click.BadParameter(f"{name} must be positive, got {value:g}")
        return value
    return check


def forecast(sweep: dict, source: str, settings: dict) -> dict:
    """The result document (kind "capacity") of every step the settings ask for."""
    from bench import capacity as cap
    from bench import capacity_fleet as fl
    from bench.capacity_report import reasoning

    service = cap.ServiceLevels(tpot_p90_s=settings["tpot_p90_ms"] / 1e3, ttft_p90_s=settings["ttft_p90_s"],
                                goodput=settings["goodput"])
    rep = cap.operating_point(sweep["levels"], service)
    points = rep.pop("points")
    notes = []
    head = sweep.get("header") or {}
    q, headroom, tp = settings["peak_quantile"], settings["headroom"], settings["tensor_parallel_size"]
    curve = fl.duration_curve(points)  # W at the load the replicas carry (docs/capacity.md, "The fixed point")

    org, per_person = None, settings["active_share"] * settings["requests_per_user_hour"] / 3600.0
    if settings["request_log"] is not None:
        stamps = cap.read_request_log(settings["request_log"])
        busiest = cap.busiest_hour(stamps)
        source_info = {"kind": "log", "path": settings["request_log"], "log_requests": len(stamps), **busiest}
        rate = busiest["rate"]
        per_person = rate / settings["org_users"] if settings["org_users"] else None
        if busiest["shorter_than_window"]:
            notes.append("The request log covers less than an hour: its own rate stands in for the busiest hour's.")
    elif settings["org_users"] is not None:
        rate = cap.arrival_rate(settings["org_users"], settings["active_share"], settings["requests_per_user_hour"])
        source_info = {"kind": "users", "users": settings["org_users"], "active_share": settings["active_share"],
                       "requests_per_user_hour": settings["requests_per_user_hour"]}
    if settings["request_log"] is not None or settings["org_users"] is not None:
        org = {**fl.fleet(rate, rep["e2e_mean_s"], rep["capacity"], q, headroom, tp, curve),
               "source": source_info}

    reverse = None
    if settings["gpus"] is not None:
        if per_person is None:
            raise cap.CapacityError("--gpus with --request-log needs --org-users: how many people the log's "
                                    "traffic comes from, to turn requests into people")
        reverse = fl.people_served(settings["gpus"], rep["e2e_mean_s"], rep["capacity"], q, headroom, tp,
                                    per_person, curve)

    kv, kv_source = settings["kv_tokens"], "--kv-tokens"
    if kv is None:
        kv = (head.get("server_info") or {}).get("max_batch_total_tokens")
        kv_source = "the server's max_batch_total_tokens, from the sweep"
    tokens = None
    if kv:
        tokens = {**cap.token_view(kv, rep["mean_prompt_tokens"], rep["mean_output_tokens"]), "source": kv_source}
    else:
        notes.append("No KV capacity known (the sweep has no server_info.max_batch_total_tokens; --kv-tokens gives "
                     "it): the token view is left out.")

    simulation = None
    if settings["simulate"]:
        simulation = _simulate(curve, rep, org, reverse, q, settings["seed"])
    if rep["saturated"]:
        notes.append("Every measured level met the service levels: the forecast uses the heaviest, so it "
                     "overstates the GPUs needed; sweep heavier loads.")
    result = {"kind": "capacity",
              "header": {"source": source, "device": head.get("device"), "model": head.get("model"),
                         "url": head.get("url"), "sweep_header": head, "command": sys.argv,
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
              "settings": settings, "levels": points, "stopped_early": None, "notes": notes,
              "service_levels": {"tpot_p90_s": service.tpot_p90_s, "ttft_p90_s": service.ttft_p90_s,
                                 "goodput": service.goodput},
              "replica": rep, "organisation": org, "reverse": reverse, "tokens": tokens, "simulation": simulation}
    result["reasoning"] = reasoning(result)
    return result


def _simulate(curve, rep, org, reverse, quantile, seed) -> dict:
    from bench import capacity as cap
    from bench.capacity_sim import simulate

    target = org or reverse
    if target is None:
        raise cap.CapacityError("--simulate needs arrivals to simulate: --org-users, --request-log or --gpus")
    sim = simulate(curve, target["rate"], target["serving_replicas"], rep["capacity"], quantile,
                   seed=seed)
    sim["agreement"] = sim["peak"] / target["peak"] - 1 if target["peak"] else 0.0
    return sim


def _lengths(ctx, param, value):
    from bench.prompts import parse_lengths

    try:
        return parse_lengths(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def sweep_first(settings: dict, output_dir: str | None) -> tuple[dict, str]:
    """Run `kvgate bench sweep`'s levels against --url (bench.sweep.run_sweep), its service levels for goodput the
    forecast's; sweep.json is rewritten after every level, so Ctrl-C keeps those finished (exit 130)."""
    import asyncio
    from pathlib import Path

    import aiohttp

    from bench.report import write_json
    from bench.report import header
    from bench.sweep import SweepSettings, new_document, run_sweep
    from engine.config import EngineConfig

    sweep = SweepSettings(url=settings["url"], api_key=settings["api_key"], model=settings["model"],
                          endpoint=settings["endpoint"], concurrency=settings["concurrency"],
                          requests=settings["requests"], prompt_tokens=settings["prompt_tokens"],
                          max_tokens=settings["max_tokens"], slo_tpot_ms=settings["tpot_p90_ms"],
                          slo_ttft_s=settings["ttft_p90_s"])
    head = header(EngineConfig())
    head["engine_config"] = None  # the server's engine is not this machine's: see server_info
    doc = new_document(sweep, head)
    path = Path(output_dir or ".") / "sweep.json"
    try:
        asyncio.run(run_sweep(sweep, doc, on_level=lambda doc, level, records: write_json(path, doc)))
    except KeyboardInterrupt:
        doc["stopped_early"] = f"interrupted (Ctrl-C) after {len(doc['levels'])} finished level(s)"
        write_json(path, doc)
        click.echo(f"interrupted: {len(doc['levels'])} finished level(s) kept in {path}; forecast from them with "
                   f"`kvgate capacity --from {path}`", err=True)
        raise click.exceptions.Exit(130) from None
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        raise click.ClickException(f"cannot reach {settings['url']}: {type(exc).__name__}: {exc}") from None
    write_json(path, doc)
    click.echo(f"swept {settings['url']}: {len(doc['levels'])} level(s) in {path}")
    return doc, str(path)


@click.command("capacity")
@click.option("--from", "from_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="a `kvgate bench sweep` result (sweep.json); without it, --url is swept first")
@server_options
@click.option("--concurrency", default=SWEEP_LEVELS, show_default=True, callback=lambda c, p, v: int_list(v),
              help="with --url: the closed-loop levels of the sweep run first")
@click.option("--requests", type=click.IntRange(min=1), default=None,
              help="with --url: measured requests per level [default: 4 x concurrency]")
@click.option("--prompt-tokens", default="512", show_default=True, callback=_lengths,
              help="with --url: prompt length, N, uniform:MIN:MAX or normal:MEAN:STD")
@click.option("--max-tokens", default="256", show_default=True, callback=_lengths,
              help="with --url: output length, N, uniform:MIN:MAX or normal:MEAN:STD")
@click.option("--tpot-p90", "tpot_p90_ms", default=50.0, show_default=True, callback=_positive("--tpot-p90"),
              help="service level: time per output token, p90, in ms (50 ms: about 20 tokens/s, a reading pace)")
@click.option("--ttft-p90", "ttft_p90_s", default=2.0, show_default=True, callback=_positive("--ttft-p90"),
              help="service level: time to first token, p90, in seconds")
@click.option("--goodput", type=float, default=None, callback=_share("--goodput", zero=False),
              help="instead: the share of requests that must meet the sweep's service levels (e.g. 0.95)")
@click.option("--org-users", type=int, default=None, help="people in the organisation (e.g. 5000)")
@click.option("--active-share", default=0.1, show_default=True, callback=_share("--active-share"),
              help="share of the people active at the busiest hour")
@click.option("--requests-per-user-hour", default=20.0, show_default=True,
              callback=_positive("--requests-per-user-hour"), help="requests an active person sends an hour")
@click.option("--request-log", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSONL of request timestamps: the busiest hour's arrival rate is measured from it")
@click.option("--peak-quantile", default=0.99, show_default=True, callback=_share("--peak-quantile", zero=False,
              one=False), help="plan for the peak concurrency at this quantile (Poisson)")
@click.option("--headroom", default=1, show_default=True, type=click.IntRange(min=0),
              help="replicas kept in reserve (one down)")
@click.option("--tensor-parallel-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="GPUs per replica")
@click.option("--gpus", type=click.IntRange(min=1), default=None, help="the reverse: how many people N GPUs serve")
@click.option("--kv-tokens", type=click.IntRange(min=1), default=None,
              help="KV pool of a replica in tokens (default: the sweep server's max_batch_total_tokens)")
@click.option("--simulate/--no-simulate", default=False, show_default=True,
              help="check the closed-form peak with a discrete-event simulation")
@click.option("--seed", default=0, show_default=True, help="the simulation's seed")
@output_dir_option
def capacity(from_path: str | None, org_users: int | None, output_dir: str | None, **options) -> None:
    """How many GPUs the organisation needs at the service levels, and how many people N GPUs serve: from a
    measured load sweep (--from, or one run first against --url), by Little's law and a Poisson peak, every step
    printed."""
    from bench.capacity import CapacityError, read_sweep
    from bench.capacity_report import print_report, write_outputs

    if org_users is not None and org_users < 1:
        raise click.BadParameter(f"the organisation needs at least one person, got {org_users}",
                                 param_hint="--org-users")
    url_given = click.get_current_context().get_parameter_source("url") != click.core.ParameterSource.DEFAULT
    if from_path is not None and url_given:
        raise click.UsageError("give --from (a sweep already measured) or --url (sweep it now), not both")
    if from_path is None and not url_given:
        raise click.UsageError("give --from sweep.json (a `kvgate bench sweep` result) or --url to sweep a "
                               "server first")
    settings = {"from": from_path, "org_users": org_users, **options, "output_dir": output_dir}
    if from_path is None:
        sweep, source = sweep_first(settings, output_dir)
    else:  # the sweep options were not used: leave them out of the record
        for name in ("url", "api_key", "model", "endpoint", "concurrency", "requests", "prompt_tokens",
                     "max_tokens"):
            settings.pop(name)
    if settings.get("api_key"):
        settings["api_key"] = "(set)"
    for name in ("prompt_tokens", "max_tokens"):
        if name in settings:
            settings[name] = str(settings[name])
    try:
        if from_path is not None:
            sweep, source = read_sweep(from_path), from_path
        result = forecast(sweep, source, settings)
    except CapacityError as exc:
        raise click.ClickException(str(exc)) from None
    print_report(result)
    if output_dir:
        paths = write_outputs(result, output_dir)
        click.echo(f"wrote {paths['json']}, {paths['html']}")
