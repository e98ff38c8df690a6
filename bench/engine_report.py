"""`kvgate bench engine`'s output: the result document (engine.json), the terminal table, the charts (PNG) and
the HTML report (engine.html), all drawn from the levels the measurement returned."""

from __future__ import annotations

from pathlib import Path

from bench import charts
from bench.html_report import View, write_html
from bench.report import figure_text

MiB, GiB = 2**20, 2**30
TITLE = "Engine benchmark"


def document(header: dict, settings: dict, levels: list[dict], stopped_early: str | None,
             notes: list[str]) -> dict:
    return {"kind": "engine", "header": header, "settings": settings, "levels": levels,
            "stopped_early": stopped_early, "notes": notes}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def summary_rows(levels: list[dict]) -> list[dict]:
    """One row per batch size: the figures of the terminal table and of the HTML summary."""
    rows = []
    for level in levels:
        prefill, decode, memory = level["prefill"], level["decode"], level["memory"]
        row = {
            "batch": level["batch_size"],
            "prefill ms p50": _ms(prefill["latency_s"]["p50"]),
            "prefill ms p90": _ms(prefill["latency_s"]["p90"]),
            "prefill tok/s": prefill["tokens_per_s"]["p50"],
            "decode ms/token p50": _ms(decode["latency_s"]["p50"]),
            "decode ms/token p90": _ms(decode["latency_s"]["p90"]),
            "decode tok/s": decode["tokens_per_s"]["p50"],
        }
        if memory["kind"] == "cuda":
            row["peak activation MiB"] = memory["peak_activation_bytes"] / MiB
            row["free GiB"] = memory["free_device_bytes"] / GiB
        else:
            row["peak RSS MiB"] = memory["peak_rss_bytes"] / MiB
        row["preemptions"] = level["preemptions"]
        rows.append(row)
    return rows


def stats_rows(level: dict) -> list[dict]:
    """A batch size's statistics, one row per figure (the HTML view of that batch size)."""
    rows = []
    for phase, unit in (("prefill", "prompt tokens/s"), ("decode", "tokens/s")):
        for figure, scale, label in (("latency_s", 1000, "latency ms" if phase == "prefill" else "ms/token"),
                                     ("tokens_per_s", 1, unit)):
            s = level[phase][figure]
            rows.append({"phase": phase, "figure": label, "n": s["n"],
                         **{k: None if s[k] is None else s[k] * scale for k in ("mean", "std", "min", "p50", "p90", "p99", "max")}})
    return rows


def memory_caption(levels: list[dict]) -> str:
    if not levels:
        return ""
    memory = levels[-1]["memory"]
    return (f"weights {_size(memory['weights_bytes'])}, KV cache {_size(memory['kv_cache_bytes'])} "
            f"({memory['kv_cache_tokens']:,} tokens: max_batch_total_tokens)"
            + ("" if memory["kind"] == "cuda" else "; CPU: memory is the process's resident set"))


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def terminal_table(levels: list[dict]):
    """The summary as a rich table: p50 / p90 side by side, so it fits a terminal."""
    from rich.table import Table

    table = Table(title=TITLE, caption=memory_caption(levels))
    cuda = bool(levels) and levels[0]["memory"]["kind"] == "cuda"
    memory = "peak activation\nMiB" if cuda else "peak RSS\nMiB"
    for column in ("batch", "prefill ms\np50 / p90", "prefill\ntok/s", "decode ms/token\np50 / p90",
                   "decode\ntok/s", memory, "preempt-\nions"):
        table.add_column(column, justify="right")
    for row in summary_rows(levels):
        t = figure_text
        table.add_row(str(row["batch"]), f"{t(row['prefill ms p50'])} / {t(row['prefill ms p90'])}",
                      t(row["prefill tok/s"]), f"{t(row['decode ms/token p50'])} / {t(row['decode ms/token p90'])}",
                      t(row["decode tok/s"]), t(row.get("peak activation MiB", row.get("peak RSS MiB"))),
                      str(row["preemptions"]))
    return table


def write_charts(out_dir: Path, levels: list[dict]) -> tuple[list[Path], dict[int, list[Path]]]:
    """The two throughput-over-latency scatters and the memory bars (one point or group per batch size), and
    per batch size its prefill and decode latency histograms (one point per sample)."""
    out_dir = Path(out_dir)
    per_batch = {}
    for level in levels:
        b = level["batch_size"]
        per_batch[b] = [
            charts.histogram(out_dir / f"prefill_latency_b{b}.png", [_ms(s) for s in level["prefill"]["samples_s"]],
                             title=f"batch {b}: prefill latency", xlabel="ms"),
            charts.histogram(out_dir / f"decode_latency_b{b}.png", [_ms(s) for s in level["decode"]["samples_s"]],
                             title=f"batch {b}: decode latency per token (one step)", xlabel="ms"),
        ]
    if not levels:
        return [], per_batch
    prefill = [(f"bs {lv['batch_size']}", _ms(lv["prefill"]["latency_s"]["p50"]), lv["prefill"]["tokens_per_s"]["p50"])
               for lv in levels]
    decode = [(f"bs {lv['batch_size']}", _ms(lv["decode"]["latency_s"]["p50"]), lv["decode"]["tokens_per_s"]["p50"])
              for lv in levels]
    cpu = levels[0]["memory"]["kind"] == "cpu"
    labels = [str(lv["batch_size"]) for lv in levels]
    memory = {
        "weights": [lv["memory"]["weights_bytes"] / GiB for lv in levels],
        "KV cache": [lv["memory"]["kv_cache_bytes"] / GiB for lv in levels],
        "peak activation": [(lv["memory"]["peak_activation_bytes"] or 0) / GiB for lv in levels],
    }
    summary = [
        charts.scatter(out_dir / "prefill_throughput_latency.png", prefill, title="Prefill: throughput over latency",
                       xlabel="prefill latency p50 (ms)", ylabel="prompt tokens/s"),
        charts.scatter(out_dir / "decode_throughput_latency.png", decode, title="Decode: throughput over latency",
                       xlabel="latency per token p50 (ms)", ylabel="tokens/s"),
        charts.bars(out_dir / "memory.png", labels, memory, ylabel="GiB",
                    title="Memory by batch size" + (" (CPU: activations not measured)" if cpu else "")),
    ]
    return summary, per_batch


def write_report(out_dir: Path, doc: dict) -> Path:
    """The charts and engine.html for the levels in doc."""
    levels = doc["levels"]
    summary, per_batch = write_charts(out_dir, levels)
    info = doc["header"].get("engine_info", {})
    settings = doc["settings"]
    intro = (f"{doc['header'].get('device')}: batches of {settings['prompt_len']}-token prompts and "
             f"{settings['decode_len']} decode steps, {settings['runs']} runs after {settings['warmups']} warm-up(s), "
             f"measured in the engine core (no HTTP, no detokenization), {info.get('step_loop', '?')} step loop. "
             f"Decode latency is per step: one new token for each sequence of the batch. " + memory_caption(levels))
    notes = list(doc["notes"])
    if doc["stopped_early"]:
        notes.insert(0, f"Stopped early: {doc['stopped_early']}")
    views = [View(f"batch {lv['batch_size']}", stats_rows(lv), per_batch[lv["batch_size"]]) for lv in levels]
    return write_html(Path(out_dir) / "engine.html", title=TITLE, intro=intro, header=doc["header"],
                      summary=summary_rows(levels), charts=summary, views=views, views_label="batch size",
                      notes=notes)
