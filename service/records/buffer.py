"""Records off the request's critical path: the route hands a record over in microseconds; a task writes
batches behind it and keeps what it could not write, retrying with a growing pause.

The write target is a coroutine: the database itself (embedded mode) or the durable Redis stream that the
records consumers drain into the database (queue mode). Only a full buffer drops records, oldest first,
and counts them, so an outage longer than `max_items` records is loud, never a hang or a slow answer.

A batch that fails is tried again in halves, down to one record a transaction (a disk that has room for a
small write again, not yet for the whole batch, takes what fits), and the size doubles back with each batch
written. `retried` counts records, each once however often it is tried; `failure` says why writes fail now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from service.core.telemetry import Metrics
from service.records.health import write_failure_cause
from service.records.model import InspectionRecord
from service.records.spill import RecordSpill

log = logging.getLogger(__name__)

Flush = Callable[[list[InspectionRecord]], Awaitable[object]]
RETRY_PAUSE_S = (0.2, 0.5, 1.0, 2.0, 5.0)


class RecordBuffer:
    def __init__(self, flush: Flush, metrics: Metrics, batch: int, max_items: int) -> None:
        self._flush = flush
        self._metrics = metrics
        self._batch = batch
        self._items: deque[InspectionRecord] = deque()
        self._max = max_items
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._failures = 0
        self._size = batch  # records in the next write: halved by each failure, doubled by each success
        self._retried: set[str] = set()  # ids already counted as retried
        self.failure: str | None = None  # why the last write failed (write_failure_cause); None: it did not

    def __len__(self) -> int:
        return len(self._items)

    def submit(self, record: InspectionRecord) -> None:
        """Never blocks, never raises: the inspection has been answered whatever happens here."""
        if len(self._items) >= self._max:
            self._retried.discard(self._items.popleft().id)
            self._metrics.records_failed.labels(reason="dropped").inc()
            log.error("records buffer full (%d): dropped the oldest record", self._max)
        self._items.append(record)
        self._metrics.records_pending.set(len(self._items))
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="filo-records-buffer")

    async def _run(self) -> None:
        while True:
            if not self._items:
                self._wake.clear()
                await self._wake.wait()
            if not await self.flush_once():
                pause = RETRY_PAUSE_S[min(self._failures, len(RETRY_PAUSE_S)) - 1]
                await asyncio.sleep(pause)

    async def flush_once(self) -> bool:
        """Write one batch from the front; on failure the batch stays at the front. True when written."""
        batch = [self._items[i] for i in range(min(self._size, len(self._items)))]
        if not batch:
            return True
        try:
            await self._flush(batch)
        except Exception as exc:  # the target is down or full: keep the records, say so, try again smaller
            self._failures += 1
            self.failure = write_failure_cause(exc)
            fresh = [r.id for r in batch if r.id not in self._retried]
            self._retried.update(fresh)
            self._metrics.records_failed.labels(reason="retried").inc(len(fresh))
            if self._failures in (1, 10) or self._failures % 100 == 0:
                log.warning("writing %d records failed (attempt %d, %s), kept for retry: %s", len(batch),
                            self._failures, self.failure, exc)
            self._size = max(1, self._size // 2)
            return False
        if self._failures:
            log.info("records written again after %d failed attempts", self._failures)
        self._failures = 0
        self.failure = None
        self._size = min(self._batch, self._size * 2)
        written = {id(r) for r in batch}  # the front may have lost records to a full buffer meanwhile
        while self._items and id(self._items[0]) in written:
            self._retried.discard(self._items.popleft().id)
        self._metrics.records_pending.set(len(self._items))
        return True

    async def stop(self, timeout_s: float = 5.0, drain: Flush | None = None, spill: RecordSpill | None = None) -> None:
        """Write what is left for up to `timeout_s`, through `drain` where given (queue mode: the stream without
        its cap), then stop. What still is not written goes to `spill`, which the next start replays; only
        without one (or with a disk that refuses it too) is it lost, and logged."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if drain is not None:
            self._flush = drain
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._items and asyncio.get_running_loop().time() < deadline:
            if not await self.flush_once():
                await asyncio.sleep(0.2)
        if not self._items:
            return
        left = list(self._items)
        if spill is None:
            log.error("stopping with %d records not written", len(left))
            return
        kept = await asyncio.to_thread(spill.write, left)
        self._items.clear()
        self._metrics.records_pending.set(0)
        if kept < len(left):
            self._metrics.records_failed.labels(reason="dropped").inc(len(left) - kept)
        log.warning("stopping: %d records not written, %d of them kept in %s for the next start to replay",
                    len(left), kept, spill.directory)
