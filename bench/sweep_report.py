"""What a sweep leaves in --output-dir: sweep.json (the result document, rewritten after every level), sweep.csv
(one row per level, flat columns), the charts, sweep.html; and what it shows on the terminal: live progress and
a table at the end (rich, on stderr).

Charts: TTFT against load (p50, p90, with the service level), TPOT against load (p50, p90, with the service
level), throughput over latency (x: TPOT p50, y: output tokens/s, one labelled point per level; top-left is
best), goodput against load (goodput and completed requests/s); per level, a histogram of its TTFTs.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from bench import charts
from bench.html_report import View, write_html
from bench.report import figure_text
from bench.sweep import Progress, level_name

METRICS = ("ttft_s", "itl_s", "tpot_s", "e2e_s")


def flat(level: dict) -> dict:
    """One CSV row: scalar fields as they are, errors as kind=count;..., each summary as <metric>_<figure>."""
    row = {}
    for key, value in level.items():
        if isinstance(value, dict) and key in METRICS:
            row.update({f"{key}_{figure}": v for figure, v in value.items()})
        elif key == "errors":
            row["errors"] = ";".join(f"{k}={v}" for k, v in sorted(value.items()))
        else:
            row[key] = value
    return row


def write_csv(path: Path, levels: list[dict]) -> None:
    rows = [flat(level) for level in levels]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def summary_row(level: dict) -> dict:
    return {
        "load": level_name(level), "completed": level["completed"], "failed": level["failed"],
        "req/s": level["requests_per_s"], "output tok/s": level["output_tokens_per_s"],
        "goodput req/s": level["goodput_requests_per_s"], "mean in flight": level["mean_concurrency"],
        "TTFT p50 s": level["ttft_s"]["p50"], "TTFT p90 s": level["ttft_s"]["p90"],
        "TPOT p50 ms": _ms(level["tpot_s"]["p50"]), "TPOT p90 ms": _ms(level["tpot_s"]["p90"]),
        "E2E p50 s": level["e2e_s"]["p50"],
    }


def level_table(level: dict) -> list[dict]:
    rows = []
    for metric in METRICS:
        s = level[metric]
        scale, unit = (1000, "ms") if metric in ("itl_s", "tpot_s") else (1, "s")
        rows.append({"metric": f"{metric[:-2].upper()} ({unit})", "n": s["n"],
                     **{k: None if s[k] is None else s[k] * scale
                        for k in ("mean", "std", "min", "p50", "p90", "p99", "max")}})
    rows.append({"metric": "errors", "n": level["failed"],
                 "mean": ", ".join(f"{k}: {v}" for k, v in level["errors"].items()) or "none"})
    return rows


def write_charts(out: Path, doc: dict, ttfts: list[list[float]]) -> tuple[list[Path], list[list[Path]]]:
    """(the sweep's charts, each level's charts)."""
    levels, s = doc["levels"], doc["settings"]
    closed = bool(levels) and levels[0]["mode"] == "concurrency"
    x = [lv["concurrency"] if closed else lv["rate"] for lv in levels]
    xlabel = "concurrent users" if closed else "requests/s offered"
    def log_x(*series) -> bool:  # a log axis needs a point to scale
        return closed and any(v is not None for ys in series for v in ys)

    ttft = [[lv["ttft_s"][q] for lv in levels] for q in ("p50", "p90")]
    tpot = [[_ms(lv["tpot_s"][q]) for lv in levels] for q in ("p50", "p90")]
    made = [
        charts.lines(out / "ttft.png", x, {"p50": ttft[0], "p90": ttft[1]}, title="Time to first token", xlabel=xlabel,
                     ylabel="s", limits={f"SLO {s['slo_ttft_s']:g} s": s["slo_ttft_s"]}, log_x=log_x(*ttft)),
        charts.lines(out / "tpot.png", x, {"p50": tpot[0], "p90": tpot[1]}, title="Time per output token", xlabel=xlabel,
                     ylabel="ms", limits={f"SLO {s['slo_tpot_ms']:g} ms": s["slo_tpot_ms"]}, log_x=log_x(*tpot)),
        charts.scatter(out / "throughput_latency.png",
                       [(level_name(lv), _ms(lv["tpot_s"]["p50"]), lv["output_tokens_per_s"]) for lv in levels
                        if lv["tpot_s"]["p50"] is not None],
                       title="Throughput over latency", xlabel="TPOT p50 (ms)", ylabel="output tokens/s"),
        charts.lines(out / "goodput.png", x, {"goodput": [lv["goodput_requests_per_s"] for lv in levels],
                                              "completed": [lv["requests_per_s"] for lv in levels]},
                     title="Goodput (requests within the service levels)", xlabel=xlabel, ylabel="requests/s",
                     log_x=log_x(x)),
    ]
    per_level = []
    for i, (lv, values) in enumerate(zip(levels, ttfts)):
        per_level.append([charts.histogram(out / f"level{i}_ttft.png", values, title=f"TTFT, {level_name(lv)}",
                                           xlabel="s")] if values else [])
    return made, per_level


def write_outputs(out: Path, doc: dict, ttfts: list[list[float]]) -> Path:
    """Everything but sweep.json: the CSV, the charts, the HTML page (its path)."""
    out = Path(out)
    write_csv(out / "sweep.csv", doc["levels"])
    made, per_level = write_charts(out, doc, ttfts)
    views = [View(level_name(lv), level_table(lv), pngs) for lv, pngs in zip(doc["levels"], per_level)]
    s = doc["settings"]
    intro = (f"{len(doc['levels'])} load level(s) against {doc['header']['url']} ({doc['header']['model']}); "
             f"service levels: TTFT <= {s['slo_ttft_s']:g} s, TPOT <= {s['slo_tpot_ms']:g} ms.")
    notes = ([f"Stopped early: {doc['stopped_early']}"] if doc["stopped_early"] else []) + doc["notes"]
    return write_html(out / "sweep.html", title="kvgate bench sweep", intro=intro, header=doc["header"],
                      summary=[summary_row(lv) for lv in doc["levels"]], charts=made, views=views,
                      views_label="load level", notes=notes)


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [summary_row(lv) for lv in doc["levels"]]
    table = Table(title="kvgate bench sweep")
    for column in (rows[0] if rows else {"load": None}):
        table.add_column(column, justify="left" if column == "load" else "right")
    for row in rows:
        table.add_row(*(figure_text(v) for v in row.values()))
    console = Console(stderr=True)
    console.print(table)
    if doc["stopped_early"]:
        console.print(f"[bold red]stopped early:[/] {doc['stopped_early']}")


class RichProgress(Progress):
    """A progress bar per level on stderr, a line per finished level."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.bars = Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         TextColumn("{task.fields[failed]} failed"), console=self.console, transient=True)
        self.task = None

    def start_level(self, name: str, total: int | None) -> None:
        self.bars.start()
        self.task = self.bars.add_task(name, total=total, failed=0)
        self.failed = 0

    def request_done(self, record) -> None:
        if not record.ok:
            self.failed += 1
        self.bars.update(self.task, advance=1, failed=self.failed)

    def end_level(self, level: dict) -> None:
        self.bars.remove_task(self.task)
        self.bars.stop()
        r, t = summary_row(level), figure_text
        self.console.print(f"{r['load']}: {r['completed']} completed, {r['failed']} failed, "
                           f"{t(r['output tok/s'])} output tok/s, goodput {t(r['goodput req/s'])} req/s, "
                           f"TTFT p50 {t(r['TTFT p50 s'])} s, TPOT p50 {t(r['TPOT p50 ms'])} ms")

    def stopped(self, reason: str) -> None:
        self.console.print(f"[bold red]stopping the sweep:[/] {reason}")

    def close(self) -> None:
        self.bars.stop()
