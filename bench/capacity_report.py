"""The capacity forecast told: each step in plain words with its numbers (printed with rich), the chart of the
measured curve against the service levels with the operating point marked, `capacity.json` (the result document,
kind "capacity") and `capacity.html`."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from bench import charts
from bench.html_report import View, write_html
from bench.report import write_json


def _n(x: float, digits: int = 3) -> str:
    """A figure for a sentence: 3 significant digits, thousands separated."""
    if x is None:
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _pct(q: float) -> str:
    return f"{q * 100:g}%"


def _load(axis: str, load: float) -> str:
    return f"concurrency {load:g}" if axis == "concurrency" else f"rate {load:g} requests/s"


def _levels_text(service: dict) -> str:
    if service["goodput"] is not None:
        return (f"at least {service['goodput']:.0%} of requests meet the service levels the sweep counted goodput "
                f"against")
    tpot = service["tpot_p90_s"]
    return (f"TPOT p90 ≤ {tpot * 1e3:g} ms (about {1 / tpot:.0f} tokens/s) and "
            f"TTFT p90 ≤ {service['ttft_p90_s']:g} s")


def _figures(p: dict, service: dict) -> str:
    if service["goodput"] is not None:
        share = p["goodput_share"]
        return f"goodput share {'n/a' if share is None else f'{share:.1%}'}"
    tpot, ttft = p["tpot_p90_s"], p["ttft_p90_s"]
    return (f"TPOT p90 {'n/a' if tpot is None else f'{tpot * 1e3:.1f} ms'}, "
            f"TTFT p90 {'n/a' if ttft is None else f'{ttft:.2f} s'}")


def reasoning(result: dict) -> list[str]:
    """The forecast, step by step, in sentences with the numbers."""
    rep, service, head = result["replica"], result["service_levels"], result["header"]
    axis, points = rep["axis"], result["levels"]
    device = head.get("device") or "an unnamed device"
    steps = [f"Measured: {len(points)} levels of a {'closed-loop' if axis == 'concurrency' else 'open-loop'} sweep "
             f"({_load(axis, points[0]['load'])} to {points[-1]['load']:g}) on {device}, "
             f"model {head.get('model') or 'unnamed'}, read from {head['source']}.",
             f"Service levels: {_levels_text(service)}."]
    low = next(p for p in points if p["load"] == rep["within_load"])
    if rep["saturated"]:
        steps.append(f"One replica: every level is within the service levels, up to {_load(axis, low['load'])} "
                     f"({_figures(low, service)}): its capacity is at least that; sweep heavier loads to find it.")
    else:
        high = next(p for p in points if p["load"] == rep["beyond_load"])
        steps.append(f"One replica: {_load(axis, low['load'])} is within ({_figures(low, service)}); "
                     f"{_load(axis, high['load'])} is beyond ({_figures(high, service)}). "
                     f"{' and '.join(rep['limited_by'])} reaches its limit {rep['fraction']:.1%} of the way from "
                     f"{low['load']:g} to {high['load']:g}, interpolated linearly.")
    steps.append(f"Operating point: load {rep['load']:.3g}, that is {rep['capacity']:.1f} concurrent requests "
                 f"(measured mean concurrency) and {rep['requests_per_s']:.3g} requests/s "
                 f"({_n(rep['output_tokens_per_s'])} output tokens/s) per replica; a request then takes "
                 f"W = {rep['e2e_mean_s']:.2f} s end to end (e2e mean) at that load.")
    if rep["within_again"]:
        steps.append(f"Note: heavier levels {', '.join(f'{x:g}' for x in rep['within_again'])} are within again; "
                     f"the first crossing is kept (a noisy curve: measure those levels again).")
    org = result["organisation"]
    if org is not None:
        source = org["source"]
        if source["kind"] == "users":
            steps.append(f"Arrivals at the busiest hour: {source['users']:,} people × {source['active_share']:.0%} "
                         f"active × {source['requests_per_user_hour']:g} requests an hour = "
                         f"{org['rate'] * 3600:,.0f} requests an hour: λ = {org['rate']:.3g} requests/s.")
        else:
            window = ("the whole log (shorter than an hour)" if source["shorter_than_window"] else
                      f"its busiest hour (from {time.strftime('%Y-%m-%d %H:%M', time.gmtime(source['start']))} "
                      f"UTC)")
            steps.append(f"Arrivals at the busiest hour: the request log {source['path']} holds "
                         f"{source['log_requests']:,} requests over {source['span_s'] / 3600:.3g} hours; "
                         f"{window} had {source['requests']:,}: λ = {org['rate']:.3g} requests/s.")
        steps += _fixed_point_steps(org, rep)
    rev = result["reverse"]
    if rev is not None:
        op = rev["at_operating_point"]
        steps.append(f"The reverse: {rev['gpus']} GPUs make {rev['replicas']} replicas; with {rev['headroom']} in "
                     f"reserve, {rev['serving_replicas']} serve up to {rev['max_peak']:,} requests in flight "
                     f"({rev['serving_replicas']} × {rep['capacity']:.1f}). The largest organisation whose "
                     f"{_pct(result['settings']['peak_quantile'])} peak fits is {rev['people']:,} people "
                     f"(λ {rev['rate']:.3g} requests/s; each serving replica carries "
                     f"m = {rev['per_replica_concurrency']:.1f} on average, where a request takes "
                     f"W = {rev['duration_s']:.2f} s; L {rev['mean_concurrency']:.1f}, peak {rev['peak']:,}). "
                     f"With W = {op['duration_s']:.2f} s at the operating point it would be {op['people']:,}.")
    tok = result["tokens"]
    if tok is not None:
        verdict = ("the limit is speed, not memory" if rep["capacity"] <= tok["concurrency_bound"] else
                   "the measured capacity is past it: at that load the scheduler preempts requests (recomputes them)")
        steps.append(f"Tokens: the KV pool holds {tok['kv_tokens']:,} tokens ({tok['source']}); a request holds "
                     f"{rep['mean_prompt_tokens']:.0f} prompt + {rep['mean_output_tokens']:.0f}/2 output = "
                     f"{tok['tokens_per_request']:.0f} tokens on average over its life, so "
                     f"{tok['concurrency_bound']:.1f} requests fit before preemption "
                     f"({tok['concurrency_bound_at_end']:.1f} if all stood at their last token); measured "
                     f"{rep['capacity']:.1f}: {verdict}.")
    sim = result["simulation"]
    if sim is not None:
        closed = org["peak"] if org is not None else rev["peak"]
        steps.append(f"Simulation: {sim['arrivals']:,} Poisson arrivals at {sim['rate']:.3g}/s on "
                     f"{sim['replicas']} serving replica(s) (least-loaded routing, durations from the measured curve, "
                     f"seed {sim['seed']}): {_pct(sim['quantile'])} peak {sim['peak']:,} in flight against "
                     f"{closed:,} in closed form ({sim['agreement']:+.1%}), mean {sim['mean_in_flight']:.1f}; a "
                     f"replica held more than its {sim['capacity']:.1f} for {sim['share_time_over_capacity']:.2%} "
                     f"of the time.")
        target = org if org is not None else rev
        steps.append(f"The simulated requests take {sim['mean_in_flight'] / sim['rate']:.2f} s on average against "
                     f"the fixed point's W = {target['duration_s']:.2f} s (mean in flight {sim['mean_in_flight']:.1f} "
                     f"against L = {target['mean_concurrency']:.1f}).")
        if abs(sim["agreement"]) > 0.05:
            steps.append(f"The simulated peak differs from the closed form's by more than 5% "
                         f"({sim['agreement']:+.1%}): treat the closed form with care here (see docs/capacity.md, "
                         f"\"The simulation\").")
    return steps


def _fixed_point_steps(org: dict, rep: dict) -> list[str]:
    """Little's law, the peak and the replicas, with W at the load the serving replicas carry."""
    q, op, serving = _pct(org["quantile"]), org["at_operating_point"], org["serving_replicas"]
    if org["from_curve"]:
        how = ("converged" if org["converged"] else "stopped, not converged,") + f" after {org['iterations']} " \
              f"iteration(s)"
        steps = [f"W at the load the replicas carry: a fleet sized for the peak runs below the operating point most "
                 f"of the time, where requests are faster. With {serving} serving replica(s) (the "
                 f"{org['headroom']} in reserve is the one down, so it carries nothing) each holds m = L / {serving} "
                 f"on average, and a request takes W = the e2e mean on the measured curve at m (clamped to the "
                 f"measured range). Iterating W -> L = λ·W -> m from W = {rep['e2e_mean_s']:.2f} s {how}: "
                 f"m = {org['per_replica_concurrency']:.1f}, W = {org['duration_s']:.2f} s."]
    else:
        steps = [f"W = {org['duration_s']:.2f} s whatever the load."]
    steps.append(f"Little's law: L = λ·W = {org['rate']:.3g} × {org['duration_s']:.2f} s = "
                 f"{org['mean_concurrency']:.1f} requests in flight on average.")
    steps.append(f"Peak: requests in flight at any instant are Poisson with mean L = {org['mean_concurrency']:.1f}; "
                 f"its {q} quantile is {org['peak']:,}: {q} of the time no more are in flight.")
    fewer, plain = org["fewer"], math.ceil(org["peak"] / org["capacity"]) if org["peak"] else serving
    sizing = f"ceil({org['peak']:,} / {org['capacity']:.1f}) = {serving} serving"
    if plain < serving and fewer is not None:
        sizing = (f"ceil({org['peak']:,} / {org['capacity']:.1f}) = {plain} would do at this W, but on "
                  f"{fewer['serving_replicas']} each would carry m = {fewer['per_replica_concurrency']:.1f}, "
                  f"where W = {fewer['duration_s']:.2f} s, L = {fewer['mean_concurrency']:.1f} and the peak "
                  f"{fewer['peak']:,} > {fewer['serving_replicas']} × {org['capacity']:.1f}; so {serving} serving, "
                  f"the fewest whose own peak fits")
    steps.append(f"Replicas: {sizing}, + {org['headroom']} in reserve = {org['replicas']} replicas × "
                 f"tensor-parallel {org['tensor_parallel_size']} = {org['gpus']} GPUs. The serving replicas run at "
                 f"{org['utilisation']:.0%} of their capacity on average.")
    if org["from_curve"]:
        steps.append(f"At the operating point (every replica at C) W would be {op['duration_s']:.2f} s, "
                     f"L {op['mean_concurrency']:.1f}, peak {op['peak']:,}, {op['serving_replicas']} serving "
                     f"replica(s): the conservative figure, kept for comparison; the answer uses the fixed point.")
    return steps


def answer(result: dict) -> str:
    rep, org, rev = result["replica"], result["organisation"], result["reverse"]
    parts = [f"One replica serves {rep['capacity']:.1f} concurrent requests ({rep['requests_per_s']:.3g} requests/s)"]
    if org is not None:
        who = (f"{org['source']['users']:,} people" if org["source"]["kind"] == "users" else "the logged traffic")
        parts.append(f"{who} need {org['gpus']} GPU(s) ({org['replicas']} replicas)")
    if rev is not None:
        parts.append(f"{rev['gpus']} GPU(s) serve {rev['people']:,} people")
    return "; ".join(parts) + "."


def print_report(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, width=None if os.isatty(1) else 110)
    service = result["service_levels"]
    table = Table(title="Measured levels")
    columns = ["load", "concurrent", "requests/s", "TPOT p90 ms", "TTFT p90 s", "e2e mean s"]
    if service["goodput"] is not None:
        columns.append("goodput share")
    for column in [*columns, "within"]:
        table.add_column(column, justify="right")
    for p in result["levels"]:
        cells = [f"{p['load']:g}", _n(p["mean_concurrency"]), _n(p["requests_per_s"]),
                 _n(None if p["tpot_p90_s"] is None else p["tpot_p90_s"] * 1e3), _n(p["ttft_p90_s"]),
                 _n(p["e2e_mean_s"])]
        if service["goodput"] is not None:
            cells.append("n/a" if p["goodput_share"] is None else f"{p['goodput_share']:.1%}")
        table.add_row(*cells, "yes" if p["within"] else f"no: {', '.join(p['missed'])}")
    console.print(table)
    for i, step in enumerate(result["reasoning"], 1):
        console.print(f"{i}. {step}")
    console.print(f"[bold]{answer(result)}[/bold]")
    for note in result["notes"]:
        console.print(f"[dim]{note}[/dim]")


def draw_charts(result: dict, out: Path) -> list[Path]:
    """The measured curve against each service level, x = concurrent requests (measured), the operating point
    marked."""
    rep, service, points = result["replica"], result["service_levels"], result["levels"]
    x = [p["mean_concurrency"] for p in points]
    mark = (f"operating point: {rep['capacity']:.1f}", rep["capacity"])
    common = {"xlabel": "concurrent requests on one replica (measured)", "mark": mark}
    if service["goodput"] is not None:
        return [charts.lines(out / "capacity-goodput.png", x, {"goodput share": [p["goodput_share"] for p in points]},
                             title="Goodput share against load", ylabel="share of requests meeting the levels",
                             limits={f"{service['goodput']:.0%}": service["goodput"]}, **common)]
    tpot = [None if p["tpot_p90_s"] is None else p["tpot_p90_s"] * 1e3 for p in points]
    return [charts.lines(out / "capacity-tpot.png", x, {"TPOT p90 (ms)": tpot}, title="TPOT p90 against load",
                         ylabel="ms", limits={f"{service['tpot_p90_s'] * 1e3:g} ms": service["tpot_p90_s"] * 1e3},
                         **common),
            charts.lines(out / "capacity-ttft.png", x, {"TTFT p90 (s)": [p["ttft_p90_s"] for p in points]},
                         title="TTFT p90 against load", ylabel="s",
                         limits={f"{service['ttft_p90_s']:g} s": service["ttft_p90_s"]}, **common)]


def summary_rows(result: dict) -> list[dict]:
    rep, org, rev, tok, sim = (result[k] for k in ("replica", "organisation", "reverse", "tokens", "simulation"))
    rows = [{"figure": "concurrent requests per replica", "value": rep["capacity"]},
            {"figure": "requests/s per replica", "value": rep["requests_per_s"]},
            {"figure": "request duration at the operating point (s)", "value": rep["e2e_mean_s"]}]
    if org is not None:
        rows += [{"figure": "λ: arrivals at the busiest hour (requests/s)", "value": org["rate"]},
                 {"figure": "W: request duration at the load the replicas carry (s)", "value": org["duration_s"]},
                 {"figure": "L = λ·W: mean requests in flight", "value": org["mean_concurrency"]},
                 {"figure": f"peak in flight ({_pct(org['quantile'])})", "value": org["peak"]},
                 {"figure": "replicas (serving + reserve)", "value": org["replicas"]},
                 {"figure": "GPUs", "value": org["gpus"]},
                 {"figure": "peak in flight with W at the operating point", "value": org["at_operating_point"]["peak"]}]
    if rev is not None:
        rows.append({"figure": f"people {rev['gpus']} GPU(s) serve", "value": rev["people"]})
    if tok is not None:
        rows.append({"figure": "concurrency before preemption (KV tokens)", "value": tok["concurrency_bound"]})
    if sim is not None:
        rows += [{"figure": "simulated peak in flight", "value": sim["peak"]},
                 {"figure": "simulated share of time over capacity", "value": sim["share_time_over_capacity"]}]
    return rows


def write_outputs(result: dict, out: Path) -> dict:
    """capacity.json, the charts and capacity.html in `out`; returns their paths."""
    out = Path(out)
    pngs = draw_charts(result, out)
    views = [View(f"{p['load']:g}", table=[{"figure": k, "value": v} for k, v in p.items()
                                           if k not in ("missed", "within")]
                  + [{"figure": "within the service levels", "value": "yes" if p["within"] else
                      f"no: {', '.join(p['missed'])}"}]) for p in result["levels"]]
    html = write_html(out / "capacity.html", title="Capacity forecast", intro=answer(result),
                      header=result["header"], summary=summary_rows(result), charts=pngs, views=views,
                      views_label=result["replica"]["axis"], notes=result["reasoning"] + result["notes"])
    doc = write_json(out / "capacity.json", result)
    return {"json": doc, "html": html, "charts": pngs}
