"""Requests other workers left behind, found and taken over.

A worker whose heartbeat lapsed is dead to the others: a few times per heartbeat interval each living worker
looks for such workers and, in one atomic step (`Consumer.take_over`), takes their pending requests and removes
them from the consumer group. As the backstop, any entry idle longer than `claim_idle_ms` is taken whoever
holds it (`Consumer.claim`). The caller runs each rescued entry in a batch of its own, so a request that kills
workers only ever counts against itself.
"""

from __future__ import annotations

import logging
import time

from service.core.telemetry import Metrics
from service.queue.consumer import Consumer
from service.queue.protocol import Entry
from service.settings import FiloSettings

log = logging.getLogger(__name__)


class Rescuer:
    """Paces the two look-ups; each call of `due_entries` does what is due now."""

    def __init__(self, consumer: Consumer, settings: FiloSettings, metrics: Metrics | None = None) -> None:
        self.consumer = consumer
        self.settings = settings
        self.metrics = metrics or Metrics()  # filo_worker_rescued_total{how}: which of the two took a request
        for how in ("heartbeat", "idle_claim"):  # both series from the start, at 0
            self.metrics.rescued.labels(how=how)
        self._last_claim = 0.0
        self._last_take_over = 0.0

    async def due_entries(self) -> list[Entry]:
        now, rescued = time.monotonic(), []
        if now - self._last_take_over >= self.settings.heartbeat_interval_ms / 4000:
            self._last_take_over = now
            taken = await self.consumer.take_over(self.settings.max_batch_size)
            for name in taken.gone:
                log.warning("worker %s: heartbeat lapsed; its requests taken over, removed from the group", name)
            if taken.entries:
                log.warning("took over %d requests of workers whose heartbeat lapsed", len(taken.entries))
                self.metrics.rescued.labels(how="heartbeat").inc(len(taken.entries))
            rescued += taken.entries
        if now - self._last_claim >= min(1.0, self.settings.claim_idle_ms / 2000):
            self._last_claim = now
            claimed = await self.consumer.claim(self.settings.max_batch_size)
            if claimed:
                log.warning("took over %d requests pending past %d ms (idle claim)", len(claimed),
                            self.settings.claim_idle_ms)
                self.metrics.rescued.labels(how="idle_claim").inc(len(claimed))
            rescued += claimed
        return rescued
