"""`Records`: what the backends give the routes for inspection records, over one store and one buffer.

Writes go through the buffer (never on the request's path); reads run the store in a thread. A database
that is down or not yet migrated answers reads with 503 `records_unavailable` and delays writes, never
inspections. The purge of records past their retention runs here by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from service.core.errors import UnavailableError
from service.core.telemetry import Metrics
from service.records.buffer import Flush, RecordBuffer
from service.records.db import default_url, migrate, open_engine
from service.records.health import NotMigrated, write_failure_cause
from service.records.model import (
    Artefact,
    Cursor,
    InspectionRecord,
    RecordQuery,
    Review,
    ThresholdChange,
)
from service.records.spill import RecordSpill
from service.records.store import RecordStore
from service.settings import FiloSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
MIGRATE_RETRY_S = 5.0
READY_POLL_S = 0.5
PURGE_RETRY_S = (1.0, 5.0, 30.0, 120.0, 600.0)


def retention_text(days: float) -> str:
    """A retention as people read it: `90 days`, `1.5 days`, `12 hours`, `36 minutes` (never `0 days`)."""
    amount, unit = next(((a, u) for a, u in ((days, "day"), (days * 24, "hour")) if a >= 1), (days * 1440, "minute"))
    return f"{amount:g} {unit}{'' if amount == 1 else 's'}"
REPLAY_PAUSE_S = (0.5, 1.0, 2.0, 5.0)


def records_url(settings: FiloSettings, state_dir: Any) -> str:
    return settings.records_url or default_url(state_dir)


class Records:
    def __init__(self, settings: FiloSettings, metrics: Metrics, url: str, flush: Flush | None = None,
                 drain: Flush | None = None, spill_dir: Path | None = None) -> None:
        self.settings = settings
        self.store = RecordStore(open_engine(url))
        self.ready = False
        # embedded mode writes straight into the database; queue mode hands `flush` the Redis stream, and on a
        # graceful stop `drain` (the stream past its cap); what neither takes is spilled to `spill_dir`
        self._target = flush or self.write
        self._drain = drain
        self.spill = RecordSpill(spill_dir) if spill_dir is not None else None
        self.buffer = RecordBuffer(self._target, metrics, settings.records_batch, settings.records_buffer_max)
        self.metrics = metrics
        self.db_failure: str | None = None  # why the last database write (or the migration) failed
        self._tasks: list[asyncio.Task] = []

    async def write(self, batch: list[InspectionRecord]) -> int:
        """Into the database now (the buffer's target in embedded mode, the stream consumer's in queue mode);
        raises while the database is down, full or not yet migrated, so the caller keeps the batch (and tries
        again in smaller ones). Each failure is counted by its cause and shown by `state`."""
        try:
            if not self.ready:
                raise NotMigrated("the records database is not migrated yet")
            written = await asyncio.to_thread(self.store.insert_many, batch)
        except Exception as exc:
            self._failed(exc)
            raise
        self.db_failure = None
        self.metrics.records_written.inc(written)
        return written

    def _failed(self, exc: BaseException) -> None:
        self.db_failure = write_failure_cause(exc)
        self.metrics.records_write_failures.labels(cause=self.db_failure).inc()

    def state(self) -> dict[str, Any]:
        """What `/readyz` says of the records: `ok`, or `degraded` with why writes fail now; `pending` is this
        process's buffer. Inspections are answered either way."""
        cause = self.buffer.failure or self.db_failure
        if cause is None:
            return {"state": "ok", "pending": len(self.buffer)}
        return {"state": "degraded", "cause": cause, "pending": len(self.buffer)}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.buffer.start()
        self._tasks = [loop.create_task(self._migrate_until_done(), name="filo-records-migrate"),
                       loop.create_task(self._purge_forever(), name="filo-records-purge")]
        if self.spill is not None:
            self._tasks.append(loop.create_task(self._replay_spill(self.spill), name="filo-records-replay"))

    async def _replay_spill(self, spill: RecordSpill) -> None:
        """Hand on what a previous run spilled when it stopped, a batch at a time, until all of it is taken;
        each record's file goes only once its target took it."""
        records = await asyncio.to_thread(spill.load)
        if not records:
            return
        log.info("replaying %d records a previous run kept in %s", len(records), spill.directory)
        attempt = 0
        while records:
            batch = records[:self.settings.records_batch]
            try:
                await self._target(batch)
            except Exception as exc:  # the target is still away or full: try again, the files stay meanwhile
                attempt += 1
                if attempt in (1, 10) or attempt % 100 == 0:
                    log.warning("replaying %d spilled records failed (attempt %d): %s", len(records), attempt, exc)
                await asyncio.sleep(REPLAY_PAUSE_S[min(attempt, len(REPLAY_PAUSE_S)) - 1])
                continue
            attempt = 0
            await asyncio.to_thread(spill.remove, batch)
            records = records[len(batch):]
        log.info("the spilled records are all handed on")

    async def _migrate_until_done(self) -> None:
        attempt = 0
        while True:
            try:
                await asyncio.to_thread(migrate, self.store.engine)
                self.ready = True
                self.db_failure = None
                return
            except SQLAlchemyError as exc:
                attempt += 1
                self.db_failure = write_failure_cause(exc)
                if attempt in (1, 10) or attempt % 100 == 0:
                    log.warning("records database unavailable (attempt %d), retrying: %s", attempt, exc)
                await asyncio.sleep(MIGRATE_RETRY_S)

    async def _purge_forever(self) -> None:
        """Purge once the database is migrated, then every `records_purge_interval_s`; a purge that failed is
        tried again after a growing pause (PURGE_RETRY_S, never longer than the interval), not a whole interval."""
        retention_ms = int(self.settings.records_retention_days * 86_400_000)
        interval = self.settings.records_purge_interval_s
        failures = 0
        while True:
            if not self.ready:
                await asyncio.sleep(READY_POLL_S)
                continue
            try:
                gone = await asyncio.to_thread(self.store.purge, retention_ms)
            except SQLAlchemyError as exc:
                failures += 1
                pause = min(interval, PURGE_RETRY_S[min(failures, len(PURGE_RETRY_S)) - 1])
                log.warning("records purge failed (attempt %d), next try in %.0f s: %s", failures, pause, exc)
                await asyncio.sleep(pause)
                continue
            failures = 0
            if gone:
                log.info("purged %d records older than %s", gone, retention_text(self.settings.records_retention_days))
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.buffer.stop(drain=self._drain, spill=self.spill)
        self.store.engine.dispose()

    def submit(self, record: InspectionRecord) -> None:
        self.buffer.submit(record)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if not self.ready:
            raise UnavailableError("records_unavailable", "the records database is not reachable yet", 5)
        try:
            return await asyncio.to_thread(fn, *args)
        except SQLAlchemyError as exc:
            log.warning("records read failed: %s", exc)
            raise UnavailableError("records_unavailable", "the records database is not reachable", 5) from None

    async def list(self, query: RecordQuery, limit: int, cursor: Cursor | None
                   ) -> tuple[list[InspectionRecord], Cursor | None]:
        return await self._read(self.store.list, query, limit, cursor)

    async def get(self, record_id: str) -> InspectionRecord | None:
        return await self._read(self.store.get, record_id)

    async def artefact(self, record_id: str, kind: str) -> Artefact | None:
        return await self._read(self.store.artefact, record_id, kind)

    async def review(self, record_id: str, review: Review) -> InspectionRecord | None:
        return await self._read(self.store.review, record_id, review)

    async def reviews(self, record_id: str) -> list[Review]:
        return await self._read(self.store.reviews, record_id)

    async def stats(self, query: RecordQuery, bucket: str) -> list[dict[str, Any]]:
        return await self._read(self.store.stats, query, bucket)

    async def reviewed(self, category: str) -> list[InspectionRecord]:
        return await self._read(self.store.reviewed, category)

    async def add_threshold_change(self, change: ThresholdChange) -> None:
        await self._read(self.store.add_threshold_change, change)

    async def threshold_history(self, category: str) -> list[ThresholdChange]:
        return await self._read(self.store.threshold_history, category)

    async def export(self, query: RecordQuery, page: int = 500) -> AsyncIterator[list[InspectionRecord]]:
        """Pages of matching records, newest first; each page is one query in a thread."""
        cursor: Cursor | None = None
        while True:
            items, cursor = await self._read(self.store.list, query, page, cursor)
            yield items
            if cursor is None:
                return
