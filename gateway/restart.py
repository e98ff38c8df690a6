"""RestartPolicy: when the gateway may start a dead engine again, and after how long.

At most `limit` attempts (each start of a new engine, whether it comes up or not) within any `window_s`; the wait
before an attempt doubles with every attempt still inside the window, from `backoff_s` up to `max_backoff_s`
(Kubernetes' crash-loop back-off, which likewise starts over once a container has run a while). Plain and
clock-injected, so its arithmetic is tested without processes."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class RestartPolicy:
    def __init__(self, limit: int, window_s: float, backoff_s: float, max_backoff_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s = limit, window_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._clock = clock
        self._attempts: deque[float] = deque()  # when each attempt inside the window began

    def _recent(self) -> int:
        now = self._clock()
        while self._attempts and now - self._attempts[0] >= self.window_s:
            self._attempts.popleft()
        return len(self._attempts)

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt; None once `limit` attempts were made within the window."""
        recent = self._recent()
        if recent >= self.limit:
            return None
        return min(self.backoff_s * 2.0 ** recent, self.max_backoff_s)

    def attempted(self) -> None:
        """An attempt begins now."""
        self._attempts.append(self._clock())

    def describe_limit(self) -> str:
        plural = "" if self.limit == 1 else "s"
        return f"the restart limit was reached ({self.limit} restart{plural} within {self.window_s:g} s)"
