"""How long a client turned away with 429 should wait: as long as queued requests recently waited.

A fixed `Retry-After: 1` sends every refused client back into a queue that is still full; the
queue wait of the latest answered requests is a direct measure of how long the queue takes to
drain, with no need to know batch sizes, worker counts or model speed.
"""

from __future__ import annotations

import math


class QueueWaitEstimate:
    """Exponentially weighted mean of observed queue waits, as a whole number of seconds."""

    def __init__(self, weight: float = 0.2, floor_s: int = 1, ceiling_s: int = 60) -> None:
        if not 0 < weight <= 1:
            raise ValueError("weight must be in (0, 1]")
        self.weight = weight
        self.floor_s = floor_s
        self.ceiling_s = ceiling_s
        self._mean_s: float | None = None

    def observe(self, wait_s: float) -> None:
        wait_s = max(0.0, float(wait_s))
        self._mean_s = wait_s if self._mean_s is None else self._mean_s + self.weight * (wait_s - self._mean_s)

    def retry_after_s(self) -> int:
        """Seconds to put in Retry-After: the mean wait rounded up, within [floor, ceiling]."""
        if self._mean_s is None:
            return self.floor_s
        return min(self.ceiling_s, max(self.floor_s, math.ceil(self._mean_s)))
