"""Step 2's sizing (docs/capacity.md, "Step 2" and "The fixed point"): W at the load the serving replicas carry,
found by iterating W -> L = λ·W -> m = L / R -> W on the measured curve; L (Little's law), the peak as the
Poisson(L) quantile, the fewest serving replicas whose own peak fits, GPUs; and the reverse, how many people N GPUs
serve. Pure functions; user errors raise CapacityError."""

from __future__ import annotations

import bisect
import math

from bench.capacity import CapacityError, poisson_quantile


def duration_curve(points: list[dict]) -> list[tuple[float, float]]:
    """(mean concurrency, e2e mean seconds) of each measured level, sorted, the unmeasured left out."""
    pairs = sorted((p["mean_concurrency"], p["e2e_mean_s"]) for p in points
                   if p.get("e2e_mean_s") is not None and p.get("mean_concurrency") is not None)
    if not pairs:
        raise CapacityError("no measured level has both a mean concurrency and an e2e mean")
    return pairs


def interpolate(curve: list[tuple[float, float]], x: float) -> float:
    """The curve's y at x: linear between its points, flat beyond its ends (clamped to the measured range: below
    the lightest level, the lightest level's latency)."""
    xs = [c for c, _ in curve]
    i = bisect.bisect_left(xs, x)
    if i == 0:
        return curve[0][1]
    if i == len(curve):
        return curve[-1][1]
    (x0, y0), (x1, y1) = curve[i - 1], curve[i]
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


FIXED_POINT_ITERATIONS = 200


def load_fixed_point(rate: float, curve: list[tuple[float, float]], serving: int, start_s: float) -> dict:
    """L = λ·W with W the curve's latency at the load each of `serving` replicas carries, m = L / serving:
    iterated from W = `start_s` (the operating point's) until L moves by less than 1e-9 (relative), at most
    FIXED_POINT_ITERATIONS times. The map is monotone in L on a rising curve, so the iterates fall (or rise)
    steadily to the fixed point nearest the start."""
    w, mean, iterations, converged = start_s, rate * start_s, 0, rate <= 0
    while not converged and iterations < FIXED_POINT_ITERATIONS:
        iterations += 1
        w = interpolate(curve, mean / serving)
        new = rate * w
        converged = abs(new - mean) <= 1e-9 * max(1.0, mean)
        mean = new
    return {"duration_s": w, "mean_concurrency": mean, "per_replica_concurrency": mean / serving if serving else 0.0,
            "iterations": iterations, "converged": converged}


def _sized(rate: float, curve, serving: int, start_s: float, quantile: float) -> dict:
    point = load_fixed_point(rate, curve, serving, start_s)
    return {"serving_replicas": serving, **point, "peak": poisson_quantile(point["mean_concurrency"], quantile)}


def fleet(rate: float, duration_s: float, capacity: float, quantile: float, headroom: int,
          tensor_parallel_size: int, curve: list[tuple[float, float]] | None = None) -> dict:
    """L = λ·W, the peak concurrency at the quantile, replicas and GPUs. `duration_s` is W at the operating point;
    with the measured `curve` (mean concurrency -> e2e mean) W is instead the fixed point at the load the serving
    replicas carry (load_fixed_point), and the serving replicas are the fewest R whose own peak fits on them:
    ceil(peak(R) / C) <= R. (Iterating R = ceil(peak / C) alone can cycle: fewer replicas run hotter, so their
    requests are slower and their peak higher.) Without a curve, W = `duration_s` whatever the load."""
    if capacity <= 0:
        raise CapacityError("a replica's capacity must be positive")
    flat, from_curve = [(0.0, duration_s)], curve is not None
    mean_at_op = rate * duration_s
    peak_at_op = poisson_quantile(mean_at_op, quantile)
    conservative = {"duration_s": duration_s, "mean_concurrency": mean_at_op, "peak": peak_at_op,
                    "serving_replicas": max(1, math.ceil(peak_at_op / capacity)) if rate > 0 else 0}
    curve = curve or flat
    if rate <= 0:
        chosen, fewer = {**_sized(rate, flat, 1, duration_s, quantile), "serving_replicas": 0}, None
    else:
        def fits(sized: dict) -> bool:
            return math.ceil(sized["peak"] / capacity) <= sized["serving_replicas"]

        ys = [y for _, y in curve]
        bound = {w: max(1, math.ceil(poisson_quantile(rate * w, quantile) / capacity)) for w in (min(ys), max(ys))}
        lo, hi = bound[min(ys)], bound[max(ys)]  # no R below lo fits; hi fits (W never exceeds the curve's top)
        sized = {hi: _sized(rate, curve, hi, duration_s, quantile)}
        if lo < hi:
            sized[lo] = _sized(rate, curve, lo, duration_s, quantile)
        if fits(sized[lo]):
            hi = lo
        while hi - lo > 1:  # fits(hi), not fits(lo); a rising curve makes fits monotone in R
            mid = (lo + hi) // 2
            sized[mid] = _sized(rate, curve, mid, duration_s, quantile)
            lo, hi = (lo, mid) if fits(sized[mid]) else (mid, hi)
        chosen = sized[hi]
        fewer = None
        if hi > 1:
            fewer = sized.get(hi - 1) or _sized(rate, curve, hi - 1, duration_s, quantile)
    serving = chosen["serving_replicas"]
    replicas = serving + headroom
    mean = chosen["mean_concurrency"]
    return {"rate": rate, "duration_s": chosen["duration_s"], "mean_concurrency": mean, "peak": chosen["peak"],
            "quantile": quantile, "capacity": capacity, "serving_replicas": serving, "headroom": headroom,
            "replicas": replicas, "tensor_parallel_size": tensor_parallel_size,
            "gpus": replicas * tensor_parallel_size, "utilisation": mean / (serving * capacity) if serving else 0.0,
            "per_replica_concurrency": chosen["per_replica_concurrency"], "iterations": chosen["iterations"],
            "converged": chosen["converged"], "from_curve": from_curve,
            "fewer": fewer, "at_operating_point": conservative}


def people_served(gpus: int, duration_s: float, capacity: float, quantile: float, headroom: int,
                  tensor_parallel_size: int, rate_per_person: float,
                  curve: list[tuple[float, float]] | None = None) -> dict:
    """The reverse: the largest organisation whose peak fits (gpus / tp - headroom) replicas. With the measured
    `curve`, an organisation's peak is that of the fixed point on those serving replicas (load_fixed_point);
    without, W = `duration_s` (the operating point's) whatever the load."""
    replicas = gpus // tensor_parallel_size
    serving = replicas - headroom
    if serving < 1:
        raise CapacityError(f"{gpus} GPU(s) make {replicas} replica(s) of tensor-parallel size "
                            f"{tensor_parallel_size}; with {headroom} kept in reserve none is left to serve")
    if rate_per_person <= 0:
        raise CapacityError("each person's request rate at the busiest hour must be positive")
    max_peak = math.floor(serving * capacity + 1e-9)

    def largest(curve) -> tuple[int, dict]:
        def sized(users: int) -> dict:
            return _sized(users * rate_per_person, curve, serving, duration_s, quantile)

        lightest = min(y for _, y in curve)
        lo, hi = 0, max(1, math.ceil((max_peak + 1) / (rate_per_person * lightest)) + 1)
        while sized(hi)["peak"] <= max_peak:  # the quantile is at least about the mean: ends at once; for safety
            hi *= 2
        while hi - lo > 1:  # lo fits, hi does not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if sized(mid)["peak"] <= max_peak else (lo, mid)
        return lo, sized(lo)

    flat = [(0.0, duration_s)]
    people, at = largest(curve or flat)
    conservative_people, conservative = largest(flat) if curve else (people, at)
    rate = people * rate_per_person
    return {"gpus": gpus, "replicas": replicas, "serving_replicas": serving, "headroom": headroom,
            "max_peak": max_peak, "people": people, "rate": rate, "duration_s": at["duration_s"],
            "mean_concurrency": at["mean_concurrency"], "per_replica_concurrency": at["per_replica_concurrency"],
            "peak": at["peak"], "rate_per_person": rate_per_person,
            "at_operating_point": {"people": conservative_people, "duration_s": duration_s,
                                   "mean_concurrency": conservative["mean_concurrency"],
                                   "peak": conservative["peak"]}}
