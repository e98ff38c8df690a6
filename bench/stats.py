"""Summary statistics of a list of measurements, the same everywhere in the benchmarks: count, mean, standard
deviation, min, p50, p90, p99, max. Percentiles interpolate linearly between the closest ranks (numpy's
default); an empty list gives None for every figure but the count."""

from __future__ import annotations

import math

FIGURES = ("mean", "std", "min", "p50", "p90", "p99", "max")


def percentile(ordered: list[float], q: float) -> float:
    """The q-quantile (0..1) of an already sorted, non-empty list."""
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values) -> dict:
    xs = sorted(float(v) for v in values)
    if not xs:
        return {"n": 0, **dict.fromkeys(FIGURES)}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"n": len(xs), "mean": mean, "std": std, "min": xs[0], "p50": percentile(xs, 0.5),
            "p90": percentile(xs, 0.9), "p99": percentile(xs, 0.99), "max": xs[-1]}
