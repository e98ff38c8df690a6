"""The benchmarks' charts: matplotlib, drawn off-screen, written as PNG. Each file records how many data points
it shows (the PNG text field `kvgate:points`), so tests and readers can check a chart against its data.

Throughput-over-latency scatters follow TGI's benchmark: latency across, throughput up, one labelled point per
batch size or load level; top-left is best.
"""

from __future__ import annotations

from pathlib import Path

POINTS_KEY = "kvgate:points"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: never open a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, points: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110, metadata={POINTS_KEY: str(points)})
    _pyplot().close(fig)
    return path


def histogram(path: Path, values: list[float], *, title: str, xlabel: str, bins: int = 30) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(values, bins=min(bins, max(1, len(set(values)))), color="#3b75af", edgecolor="white")
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    return _save(fig, path, len(values))


def scatter(path: Path, points: list[tuple[str, float, float]], *, title: str, xlabel: str, ylabel: str) -> Path:
    """points: (label, x, y); x is a latency, y a throughput."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([p[1] for p in points], [p[2] for p in points], color="#bbbbbb", zorder=1)
    ax.scatter([p[1] for p in points], [p[2] for p in points], color="#c8553d", zorder=2)
    for label, x, y in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.text(0.01, 0.98, "top-left is best", transform=ax.transAxes, va="top", fontsize=8, color="#777777")
    ax.grid(alpha=0.3)
    return _save(fig, path, len(points))


def lines(path: Path, x: list[float], series: dict[str, list[float | None]], *, title: str, xlabel: str,
          ylabel: str, limits: dict[str, float] | None = None, mark: tuple[str, float] | None = None,
          log_x: bool = False) -> Path:
    """One line per series over x (None: no point there); `limits` draws labelled horizontal lines (service
    levels), `mark` a labelled vertical one (the operating point)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for name, ys in series.items():
        pairs = [(a, b) for a, b in zip(x, ys) if b is not None]
        ax.plot([a for a, _ in pairs], [b for _, b in pairs], marker="o", label=name)
        drawn += len(pairs)
    for name, y in (limits or {}).items():
        ax.axhline(y, linestyle="--", color="#888888", linewidth=1)
        ax.annotate(name, (0.01, y), xycoords=("axes fraction", "data"), xytext=(0, 3), textcoords="offset points",
                    fontsize=8, color="#555555")
    if mark is not None:
        ax.axvline(mark[1], color="#2a9d8f", linewidth=1.5)
        ax.annotate(mark[0], (mark[1], 0.98), xycoords=("data", "axes fraction"), xytext=(4, -10),
                    textcoords="offset points", fontsize=8, color="#2a9d8f")
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path, drawn)


def bars(path: Path, labels: list[str], series: dict[str, list[float]], *, title: str, ylabel: str,
         stacked: bool = True) -> Path:
    """Grouped or stacked bars: one group per label, one bar (or segment) per series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    positions = range(len(labels))
    bottom = [0.0] * len(labels)
    width = 0.8 if stacked else 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = list(positions) if stacked else [p - 0.4 + width * (i + 0.5) for p in positions]
        ax.bar(xs, values, width, bottom=bottom if stacked else None, label=name)
        if stacked:
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(list(positions), labels)
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path, len(labels) * len(series))


def points_of(path: Path) -> int:
    """How many data points a chart written here shows."""
    from PIL import Image

    with Image.open(path) as image:
        return int(image.text[POINTS_KEY])
