"""A discrete-event check of the closed-form forecast (docs/capacity.md, "The simulation").

Requests arrive as a Poisson process at rate λ and go to the replica with the fewest in flight. A request's
duration is the measured mean end-to-end latency at the number of requests its replica then holds (itself
included), interpolated linearly over the sweep's curve (measured mean concurrency -> e2e mean) and held flat
beyond its ends; it does not change afterwards. The time-weighted distribution of requests in flight across the
fleet gives the peak at a quantile, comparable with the Poisson(λ·W) peak, and the share of time any replica holds
more than its capacity. Seeded, with a bounded number of arrivals, so a run is repeatable and takes well under a
second."""

from __future__ import annotations

import heapq
import random

from bench.capacity_fleet import duration_curve, interpolate  # noqa: F401  (the curve the closed form reads too)


def simulate(curve: list[tuple[float, float]], rate: float, replicas: int, capacity: float, quantile: float,
             *, seed: int = 0, arrivals: int = 120_000, warmup_durations: float = 10.0) -> dict:
    """Simulate `arrivals` Poisson arrivals at `rate` requests/s on `replicas` replicas of the given capacity
    (concurrent requests each); the first `warmup_durations` × the longest duration are not counted."""
    if rate <= 0 or replicas < 1 or arrivals < 1:
        raise ValueError("the simulation needs a positive rate, at least one replica and one arrival")
    rng = random.Random(seed)
    in_flight = [0] * replicas
    departures: list[tuple[float, int]] = []
    warmup = warmup_durations * max(y for _, y in curve)
    time_at: dict[int, float] = {}
    now = total = over = 0
    over_time = counted = 0.0

    def advance(to: float) -> None:
        nonlocal now, over_time, counted
        start = max(now, warmup)
        if to > start:
            dt = to - start
            time_at[total] = time_at.get(total, 0.0) + dt
            counted += dt
            if over:
                over_time += dt
        now = to

    next_arrival = rng.expovariate(rate)
    for _ in range(arrivals):
        while departures and departures[0][0] <= next_arrival:
            when, r = heapq.heappop(departures)
            advance(when)
            in_flight[r] -= 1
            total -= 1
            if in_flight[r] + 1 > capacity >= in_flight[r]:
                over -= 1
        advance(next_arrival)
        r = min(range(replicas), key=in_flight.__getitem__)
        in_flight[r] += 1
        total += 1
        if in_flight[r] > capacity >= in_flight[r] - 1:
            over += 1
        heapq.heappush(departures, (now + interpolate(curve, in_flight[r]), r))
        next_arrival = now + rng.expovariate(rate)
    if counted <= 0:
        raise ValueError("the simulation ended inside its warm-up: give it more arrivals")
    peak, cumulative = 0, 0.0
    for k in sorted(time_at):
        cumulative += time_at[k]
        if cumulative >= quantile * counted:
            peak = k
            break
    return {"arrivals": arrivals, "seed": seed, "replicas": replicas, "capacity": capacity, "rate": rate,
            "simulated_s": counted, "warmup_s": warmup,
            "mean_in_flight": sum(k * t for k, t in time_at.items()) / counted,
            "peak": peak, "quantile": quantile, "max_in_flight": max(time_at),
            "share_time_over_capacity": over_time / counted}
