"""Open-loop arrival schedules: when each request of a rate level is sent, whatever the server does.

Inter-arrival times are gamma-distributed with shape = burstiness and mean 1/rate, as vLLM's benchmark draws
them: burstiness 1 is a Poisson process (exponential gaps), below 1 burstier (the same mean, a larger variance:
variance = 1 / (burstiness * rate^2)), above 1 more even. The first request goes at once."""

from __future__ import annotations

import random


def gaps(rate: float, burstiness: float = 1.0, seed: int = 0):
    """An endless stream of inter-arrival times (s), the same for the same arguments."""
    if not rate > 0 or not burstiness > 0:
        raise ValueError(f"rate and burstiness must be positive, got {rate} and {burstiness}")
    rng = random.Random(f"arrivals-{seed}")
    shape, scale = burstiness, 1.0 / (rate * burstiness)
    while True:
        yield rng.gammavariate(shape, scale)


def schedule(rate: float, burstiness: float = 1.0, seed: int = 0, *, requests: int | None = None,
             duration_s: float | None = None) -> list[float]:
    """Send times (s after the level starts) of `requests` arrivals, or of every arrival before `duration_s`."""
    if (requests is None) == (duration_s is None):
        raise ValueError("give exactly one of requests and duration_s")
    times, t = [0.0], 0.0
    for gap in gaps(rate, burstiness, seed):
        if requests is not None and len(times) >= requests:
            break
        t += gap
        if duration_s is not None and t >= duration_s:
            break
        times.append(t)
    return times[:requests] if requests is not None else times
