"""The capacity forecast's arithmetic: pure functions on a `kvgate bench sweep` result (docs/capacity.md).

1. One replica: the largest load on the measured curve whose TPOT p90 and TTFT p90 (or goodput share) stay
   within the service levels, interpolated linearly between the last level within and the first beyond.
2. The organisation: the busiest hour's arrival rate λ and the exact Poisson quantile; the sizing itself (W at the
   load the replicas carry, L = λ·W, the peak, replicas and GPUs, and the reverse) is bench/capacity_fleet.py.
3. The token view: the KV pool in tokens over the tokens a request holds.

Every user error raises CapacityError with a message a person can act on."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

LEVEL_FIELDS = ("mode", "concurrency", "rate", "requests", "completed", "failed", "duration_s", "requests_per_s",
                "goodput_requests_per_s", "mean_prompt_tokens", "mean_output_tokens", "mean_concurrency",
                "ttft_s", "tpot_s", "e2e_s")
SUMMARIES = ("ttft_s", "tpot_s", "e2e_s")


class CapacityError(ValueError):
    """Bad input or a question the measurements cannot answer; the message says which and why."""


# ---- reading the sweep -------------------------------------------------------------------------------------


def read_sweep(path: str | Path) -> dict:
    """The sweep result document at `path`, its levels checked."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CapacityError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CapacityError(f"{path}: cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise CapacityError(f"{path}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise CapacityError(f"{path}: expected a `kvgate bench sweep` result (a JSON object), got "
                            f"{type(doc).__name__}")
    if doc.get("kind", "sweep") != "sweep":
        raise CapacityError(f"{path}: a {doc.get('kind')!r} result, not a sweep; `kvgate capacity` reads the "
                            f"result of `kvgate bench sweep`")
    check_levels(doc.get("levels"), str(path))
    return doc


def check_levels(levels, where: str = "the sweep") -> None:
    if not isinstance(levels, list) or not levels:
        raise CapacityError(f"{where}: no measured levels (`levels` is empty or missing): nothing to forecast from")
    for i, level in enumerate(levels):
        if not isinstance(level, dict):
            raise CapacityError(f"{where}: level {i} is not an object")
        missing = [f for f in LEVEL_FIELDS if f not in level]
        if missing:
            raise CapacityError(f"{where}: level {i} lacks {', '.join(missing)}")
        for name in SUMMARIES:
            if not isinstance(level[name], dict) or "p90" not in level[name]:
                raise CapacityError(f"{where}: level {i}: {name} is not a summary (n, mean, p50, p90, ...)")
        if level["mode"] not in ("concurrency", "rate"):
            raise CapacityError(f"{where}: level {i}: mode {level['mode']!r} (expected concurrency or rate)")
    modes = {level["mode"] for level in levels}
    if len(modes) > 1:
        raise CapacityError(f"{where}: mixes concurrency and rate levels; forecast from one sweep mode at a time")


def load_of(level: dict) -> float:
    """The level's offered load: its concurrency (closed loop) or its rate (open loop; none: as fast as it can)."""
    value = level["concurrency"] if level["mode"] == "concurrency" else level["rate"]
    return math.inf if value is None else float(value)


# ---- step 1: one replica -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceLevels:
    """What a user accepts: TPOT p90 (s) and TTFT p90 (s), or a goodput share (the share of requests that met the
    service levels the sweep counted goodput against) instead."""
    tpot_p90_s: float = 0.050
    ttft_p90_s: float = 2.0
    goodput: float | None = None

    def criteria(self) -> list[tuple[str, str, float, bool]]:
        """(name, figure, limit, the figure must stay at or below the limit)."""
        if self.goodput is not None:
            return [("goodput share", "goodput_share", self.goodput, False)]
        return [("TPOT p90", "tpot_p90_s", self.tpot_p90_s, True), ("TTFT p90", "ttft_p90_s", self.ttft_p90_s, True)]


def goodput_share(level: dict) -> float | None:
    """Requests that met the sweep's service levels over all requests sent (failed ones count as missed)."""
    if not level["requests"]:
        return None
    return level["goodput_requests_per_s"] * level["duration_s"] / level["requests"]


def point(level: dict) -> dict:
    """The figures of one measured level that the forecast uses."""
    return {"load": load_of(level), "mean_concurrency": level["mean_concurrency"],
            "requests_per_s": level["requests_per_s"], "output_tokens_per_s": level.get("output_tokens_per_s"),
            "e2e_mean_s": level["e2e_s"].get("mean"), "tpot_p90_s": level["tpot_s"]["p90"],
            "ttft_p90_s": level["ttft_s"]["p90"], "goodput_share": goodput_share(level),
            "mean_prompt_tokens": level["mean_prompt_tokens"], "mean_output_tokens": level["mean_output_tokens"],
            "completed": level["completed"], "failed": level["failed"]}


def missed(p: dict, levels: ServiceLevels) -> list[str]:
    """The criteria a measured point misses (a figure not measured counts as missed)."""
    out = []
    for name, figure, limit, upper in levels.criteria():
        value = p[figure]
        if value is None or (value > limit if upper else value < limit):
            out.append(name)
    return out


def _lerp(a, b, t: float):
    if a is None or b is None:
        return a
    return a + (b - a) * t


def operating_point(levels: list[dict], service: ServiceLevels) -> dict:
    """The largest load within the service levels, interpolated between the two levels that bound it."""
    check_levels(levels)
    points = sorted((point(level) for level in levels), key=lambda p: p["load"])
    for p in points:
        p["missed"] = missed(p, service)
        p["within"] = not p["missed"]
    first_out = next((i for i, p in enumerate(points) if not p["within"]), None)
    if first_out == 0:
        p = points[0]
        raise CapacityError(f"even the lightest measured level (load {p['load']:g}, {p['mean_concurrency']:.3g} "
                            f"concurrent requests) misses the service levels ({describe_miss(p, service)}): this "
                            f"server cannot meet them at any load measured; relax the levels or measure a lighter "
                            f"load")
    if first_out is None:  # never crossed: the heaviest level is a lower bound of the capacity
        low, high, t, limited_by = points[-1], None, 0.0, []
    else:
        low, high = points[first_out - 1], points[first_out]
        t, limited_by = 1.0, []
        for name, figure, limit, upper in service.criteria():
            a, b = low[figure], high[figure]
            if name not in high["missed"]:
                continue
            crossing = 0.0 if b is None or b == a else (limit - a) / (b - a)
            crossing = min(max(crossing, 0.0), 1.0)
            if crossing < t - 1e-12:
                t, limited_by = crossing, [name]
            elif abs(crossing - t) <= 1e-12:
                limited_by.append(name)
    fig = {key: (_lerp(low[key], high[key], t) if high is not None else low[key])
           for key in ("load", "mean_concurrency", "requests_per_s", "output_tokens_per_s", "e2e_mean_s",
                       "tpot_p90_s", "ttft_p90_s", "goodput_share", "mean_prompt_tokens", "mean_output_tokens")}
    if fig["e2e_mean_s"] is None or not fig["mean_concurrency"] or fig["mean_concurrency"] <= 0:
        raise CapacityError("the operating point has no measured request duration (e2e mean) or concurrency")
    later = [p["load"] for p in points[(first_out or len(points)) + 1:] if p["within"]]
    return {"axis": levels[0]["mode"], **fig, "capacity": fig["mean_concurrency"],
            "within_load": low["load"], "beyond_load": None if high is None else high["load"], "fraction": t,
            "limited_by": limited_by, "saturated": high is None, "within_again": later, "points": points}


def describe_miss(p: dict, service: ServiceLevels) -> str:
    parts = []
    for name, figure, limit, upper in service.criteria():
        if name in p["missed"]:
            value = p[figure]
            if value is None:
                parts.append(f"{name} not measured")
            elif figure == "goodput_share":
                parts.append(f"{name} {value:.1%} < {limit:.1%}")
            elif figure == "tpot_p90_s":
                parts.append(f"{name} {value * 1e3:.1f} ms > {limit * 1e3:g} ms")
            else:
                parts.append(f"{name} {value:.2f} s > {limit:g} s")
    return ", ".join(parts)


# ---- step 2: the organisation ------------------------------------------------------------------------------


def arrival_rate(users: int, active_share: float, requests_per_user_hour: float) -> float:
    """λ at the busiest hour, requests/s: users × active share × requests per active user an hour / 3600."""
    if users < 1:
        raise CapacityError(f"the organisation needs at least one person (got {users})")
    if not 0 <= active_share <= 1:
        raise CapacityError(f"the active share is a share of people, between 0 and 1 (got {active_share})")
    return users * active_share * requests_per_user_hour / 3600.0


def _timestamp(value, line: int, path) -> float:
    if isinstance(value, dict):
        for key in ("timestamp", "time", "created", "ts"):
            if key in value:
                return _timestamp(value[key], line, path)
        raise CapacityError(f"{path}:{line}: no timestamp (expected a number, an ISO time, or an object with "
                            f"`timestamp`, `time` or `created`)")
    if isinstance(value, bool):
        raise CapacityError(f"{path}:{line}: {value!r} is not a timestamp")
    if isinstance(value, (int, float)):
        return float(value) / 1000.0 if value > 1e11 else float(value)  # milliseconds since the epoch, too
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise CapacityError(f"{path}:{line}: {value!r} is not a timestamp")


def read_request_log(path: str | Path) -> list[float]:
    """Request timestamps (s since the epoch) from a JSONL file: one number, ISO time or object per line."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise CapacityError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CapacityError(f"{path}: cannot be read ({exc})") from None
    stamps = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CapacityError(f"{path}:{number}: not JSON ({exc.msg})") from None
        stamps.append(_timestamp(value, number, path))
    if len(stamps) < 2:
        raise CapacityError(f"{path}: {len(stamps)} request(s); the busiest hour needs at least two timestamps")
    return sorted(stamps)


def busiest_hour(stamps: list[float], window_s: float = 3600.0) -> dict:
    """The most arrivals in any window of an hour (sliding, starting at an arrival) and the rate they make. A log
    shorter than an hour gives its own rate, (n - 1) / span."""
    stamps = sorted(stamps)
    span = stamps[-1] - stamps[0]
    if span <= 0:
        raise CapacityError("the request log's timestamps are all the same instant: no rate can be measured")
    if span < window_s:
        return {"rate": (len(stamps) - 1) / span, "requests": len(stamps), "start": stamps[0], "span_s": span,
                "shorter_than_window": True}
    best, best_start, j = 0, stamps[0], 0
    for i, start in enumerate(stamps):
        while j < len(stamps) and stamps[j] < start + window_s:
            j += 1
        if j - i > best:
            best, best_start = j - i, start
    return {"rate": best / window_s, "requests": best, "start": best_start, "span_s": span,
            "shorter_than_window": False}


def poisson_quantile(mu: float, q: float) -> int:
    """The smallest k with P(X <= k) >= q for X ~ Poisson(mu): the exact inverse CDF, summed in log space from
    far enough below the mean that the mass left out is under 1e-30."""
    if not 0 < q < 1:
        raise CapacityError(f"a quantile lies strictly between 0 and 1 (got {q})")
    if mu <= 0:
        return 0
    k = max(0, int(mu - 12 * math.sqrt(mu) - 10))
    log_mu, cdf = math.log(mu), 0.0
    while True:
        cdf += math.exp(k * log_mu - mu - math.lgamma(k + 1))
        if cdf >= q or k > mu + 40 * math.sqrt(mu) + 100:
            return k
        k += 1


# ---- step 3: the token view --------------------------------------------------------------------------------


def token_view(kv_tokens: int, mean_prompt_tokens: float, mean_output_tokens: float) -> dict:
    """How many requests the KV pool holds at once before the scheduler must preempt. A request holds its prompt
    from its first step and its output grows from 0 to all of it, so over its life it holds on average
    prompt + output / 2 tokens: the bound for many requests at random points of their lives. At its last step it
    holds prompt + output: the bound if all were at their end at once (the worst case)."""
    if kv_tokens <= 0:
        raise CapacityError(f"the KV capacity in tokens must be positive (got {kv_tokens})")
    average = mean_prompt_tokens + mean_output_tokens / 2
    worst = mean_prompt_tokens + mean_output_tokens
    if average <= 0:
        raise CapacityError("the sweep's requests hold no tokens (mean prompt and output are 0)")
    return {"kv_tokens": kv_tokens, "tokens_per_request": average, "tokens_per_request_at_end": worst,
            "concurrency_bound": kv_tokens / average, "concurrency_bound_at_end": kv_tokens / worst}
