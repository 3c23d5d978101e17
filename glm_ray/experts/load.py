"""How busy an expert replica is: seconds spent computing per wall second, and tokens computed per
second, over a look-back window. The autoscaler's signal (a busy fraction summed over a group's
replicas says how many replicas' worth of work the group has) and the router's load figures.

Plain Python, thread-safe (the gRPC loop thread records, the replica's loop reads), O(1) per
record: work is added to one-second buckets, and reading sums the buckets inside the window.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque


class LoadMeter:
    def __init__(self, window_s: float = 10.0, clock=time.monotonic):
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self.clock = clock
        self._buckets: deque[list] = deque()  # [second, busy seconds, tokens], oldest first
        self._lock = threading.Lock()
        self._start = clock()

    def record(self, busy_s: float, num_tokens: int, end: float | None = None) -> None:
        """One piece of work that ended at `end` (now by default)."""
        second = math.floor(self.clock() if end is None else end)
        with self._lock:
            if self._buckets and self._buckets[-1][0] == second:
                bucket = self._buckets[-1]
                bucket[1] += busy_s
                bucket[2] += num_tokens
            else:
                self._buckets.append([second, busy_s, num_tokens])
            self._trim(second)

    def _trim(self, now_second: float) -> None:
        horizon = now_second - math.ceil(self.window_s) - 1
        while self._buckets and self._buckets[0][0] < horizon:
            self._buckets.popleft()

    def rates(self, window_s: float | None = None) -> tuple[float, float]:
        """(busy fraction in 0..1, tokens per second) over the last `window_s` seconds (at most the
        meter's own window), to within one second's work; a replica younger than the window is
        judged on its lifetime."""
        now = self.clock()
        window = min(window_s or self.window_s, self.window_s)
        span = max(1e-9, min(window, now - self._start))
        since = now - window
        with self._lock:
            self._trim(math.floor(now))
            # a bucket counts if any of its second lies inside the window
            busy = sum(b[1] for b in self._buckets if b[0] + 1 > since)
            tokens = sum(b[2] for b in self._buckets if b[0] + 1 > since)
        return min(1.0, busy / span), tokens / span
