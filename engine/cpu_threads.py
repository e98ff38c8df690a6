"""How many threads the engine core's CPU work (torch's intra-op pool) uses, re-chosen as other processes take the
cores it may run on.

torch starts one thread per core and its OpenMP threads spin while they wait for each other: fastest on an idle
machine, and a collapse when another process holds one of those cores, since every parallel region then waits
for the thread that shares a core with it. Measured on a 2-core machine, `kvgate serve` with the default model,
one client: 23.9 output tokens/s idle, 1.6 with a busy loop on one core; with one thread, 15.2 and 15.0. So the
core starts with a thread per core it may run on (its affinity, not the machine's core count) and, about once a
second, measures how much of those cores other processes used (the gateway included): past `SLACK` of a core,
one thread fewer for each core they take; when they leave, the threads come back. OMP_NUM_THREADS set by the
user fixes the count instead.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

logger = logging.getLogger("kvgate.engine")

INTERVAL_S = 1.0
SLACK = 0.35  # of a core, others may use (the gateway's own work) before the engine gives a thread up
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_seconds(cores: list[int]) -> float | None:
    """CPU seconds spent on these cores by anyone since boot (/proc/stat: all but idle and iowait)."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted, total = {f"cpu{c}" for c in cores}, 0
    for line in lines:
        name, *fields = line.split()
        if name in wanted:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
            total += user + nice + system + irq + softirq + steal
    return total / _TICK


class CpuThreads:
    def __init__(self, cores: list[int], set_threads: Callable[[int], None],
                 busy: Callable[[], float | None] | None = None, own: Callable[[], float] = time.process_time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.most = len(cores)
        self._set = set_threads
        self._busy = busy or (lambda: busy_seconds(cores))
        self._own, self._clock = own, clock
        self.threads = self.most
        self._set(self.threads)
        self._last = (clock(), self._busy(), own())

    @classmethod
    def for_device(cls, device: str) -> CpuThreads | None:
        """The controller for a core on `device`; None on a GPU, where OMP_NUM_THREADS is set, or without /proc."""
        if not device.startswith("cpu") or "OMP_NUM_THREADS" in os.environ or not hasattr(os, "sched_getaffinity"):
            return None
        cores = sorted(os.sched_getaffinity(0))
        if busy_seconds(cores) is None:
            return None
        import torch

        return cls(cores, torch.set_num_threads)

    def adjust(self) -> int:
        """Called once a step; re-measures at most every INTERVAL_S. The thread count now."""
        now = self._clock()
        t0, busy0, own0 = self._last
        if now - t0 < INTERVAL_S:
            return self.threads
        busy, own = self._busy(), self._own()
        self._last = (now, busy, own)
        if busy is None or busy0 is None:
            return self.threads
        others = max(0.0, (busy - busy0) - (own - own0)) / (now - t0)  # cores' worth other processes used
        want = max(1, min(self.most, self.most - math.ceil(others - SLACK)))
        if want != self.threads:
            logger.info("engine threads %d -> %d: other processes used %.2f of the %d cores", self.threads, want,
                        others, self.most)
            self.threads = want
            self._set(want)
        return self.threads
