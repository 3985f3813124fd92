"""The queue-mode backend: API pods hand requests to `filo worker` processes through a Redis stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable

from redis.exceptions import LockError, RedisError
from sqlalchemy.exc import SQLAlchemyError

from descriptions import Category
from service.backends.base import CategoryApplied, InspectJob, InspectOutcome, Readiness
from service.backends.jobs import RedisJobs
from service.catalog.durable import CatalogKeeper
from service.catalog.references import REFERENCES_KIND, THRESHOLD_KIND, RedisExtras, ReferenceSet
from service.catalog.store import CatalogNotPublishedError, RedisCategoryStore, default_state_dir
from service.catalog.thresholds import ThresholdRecord, ThresholdRule, resolve
from service.core.errors import (
    CategoryNotFoundError,
    DeadlineExceededError,
    QueueFullError,
    ServiceError,
    UnavailableError,
)
from service.core.keys import Keys
from service.core.redis_client import redis_client
from service.core.retry_after import QueueWaitEstimate
from service.core.telemetry import Metrics
from service.queue.producer import NO_WORKERS, NOT_SEEDED, QUEUE_FULL, UNKNOWN_CATEGORY, Producer
from service.queue.protocol import Job, ensure_group, result_from_dict
from service.queue.records_stream import RecordAppender, RecordConsumer
from service.records.catalog_archive import CatalogArchive
from service.records.recorder import Records, records_url
from service.settings import FiloSettings

log = logging.getLogger(__name__)


class RedisBackend:
    """Hands requests to `filo worker` processes through a Redis stream; runs no model itself."""

    mode = "queue"
    decodes_in_process = False

    def __init__(self, settings: FiloSettings, metrics: Metrics | None = None) -> None:
        if not settings.redis_url:
            raise ValueError("RedisBackend needs settings.redis_url")
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.fatal: BaseException | None = None
        self.redis = redis_client(settings.redis_url, settings.request_timeout_s)
        self.keys = Keys.from_settings(settings)
        self.producer = Producer(self.redis, settings)
        self.store = RedisCategoryStore(self.redis, self.keys)
        self.waits = QueueWaitEstimate()  # Retry-After of 429s
        self.jobs = RedisJobs(self.redis, self.keys, settings.job_claim_s)
        # records: appended to a Redis stream (durable hand-off), drained into the database by every API pod
        self.records: Records | None = None
        self._recorder: RecordConsumer | None = None
        self._recorder_task: asyncio.Task | None = None
        self._keeper: CatalogKeeper | None = None  # the catalog's durable copy in the records database
        self._keeper_task: asyncio.Task | None = None
        if settings.records:
            url = records_url(settings, settings.state_dir or default_state_dir())
            self.records = Records(settings, self.metrics, url, flush=RecordAppender(self.redis, settings, self.metrics))
            self._recorder = RecordConsumer(self.redis, self.records, settings, self.metrics,
                                            f"{socket.gethostname()}-{os.getpid()}")
            self._keeper = CatalogKeeper(self.store, CatalogArchive(self.records.store.engine), self.metrics,
                                         settings.catalog_sync_s)

    async def start(self) -> None:
        try:
            await ensure_group(self.redis, self.keys)
        except RedisError as exc:  # not fatal: /readyz says so, requests get 503 until Redis is back
            log.warning("Redis unreachable at start (%s); will keep trying per request", exc)
        if self.records is not None and self._recorder is not None:
            await self.records.start()
            self._recorder_task = asyncio.get_running_loop().create_task(self._recorder.run(),
                                                                         name="filo-records-writer")
            self._keeper_task = asyncio.get_running_loop().create_task(self._keep_catalog(), name="filo-catalog")

    async def _keep_catalog(self) -> None:
        assert self.records is not None and self._keeper is not None
        while not self.records.ready:  # the database's tables come first
            await asyncio.sleep(0.5)
        await self._keeper.run()

    async def _write_through(self) -> None:
        """After a category write: its durable copy now (the keeper's loop retries when the database is away)."""
        if self._keeper is None or self.records is None or not self.records.ready:
            return
        try:
            await self._keeper.sync()
        except (RedisError, SQLAlchemyError, OSError) as exc:
            log.warning("category catalog not yet copied to the database (%s); retrying in the background", exc)

    async def stop(self) -> None:
        for task in (self._recorder_task, self._keeper_task):
            if task is None:
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.records is not None:
            await self.records.stop()
        await self.redis.aclose()

    async def readiness(self) -> Readiness:
        """Ready only when a request would be served now: Redis answers, a catalog is published, and a
        worker heartbeat is live (unless requests are meant to wait for workers scaling from zero)."""
        try:
            await self.redis.ping()
            seeded = await self.store.version() > 0
            workers = await self.producer.workers_alive()
            depth = await self.producer.depth()
        except RedisError as exc:
            return Readiness(False, {"redis": f"unreachable: {exc}"})
        detail = {"redis": "ok", "categories_published": seeded, "workers": workers, "queue_depth": depth}
        return Readiness(seeded and (workers > 0 or not self.settings.reject_without_workers), detail)

    def _unavailable(self, exc: Exception, queued: bool) -> UnavailableError:
        if queued:
            return UnavailableError(
                "redis_unavailable",
                f"the request was queued but Redis became unreachable before its answer arrived ({exc}); "
                "its result is lost to this call, retry it",
            )
        return UnavailableError("redis_unavailable", f"the queue (Redis) is unreachable; request not accepted ({exc})")

    async def inspect(self, job: InspectJob) -> InspectOutcome:
        left_s = job.deadline - time.monotonic()
        if left_s <= 0:
            raise DeadlineExceededError()
        queued = Job(job.request_id, job.category, job.image_bytes, int(left_s * 1000), job.top_k, job.grounding,
                     job.want_map, job.heatmap.as_dict() if job.heatmap.wanted else None)
        try:
            outcome, depth = await self.producer.enqueue(queued)
        except RedisError as exc:
            raise self._unavailable(exc, queued=False) from None
        self.metrics.queue_depth.set(depth)
        if outcome == UNKNOWN_CATEGORY:
            raise CategoryNotFoundError(job.category, [c.name for c in await self.list_categories()])
        if outcome == QUEUE_FULL:
            raise QueueFullError(f"{depth} requests already queued (limit {self.settings.queue_max_depth})",
                                 self.waits.retry_after_s())
        if outcome == NO_WORKERS:
            raise UnavailableError("no_workers", "no `filo worker` is alive to run the request; not queued "
                                   "(FILO_REJECT_WITHOUT_WORKERS=false queues it for workers that scale from zero)",
                                   retry_after_s=5)
        if outcome == NOT_SEEDED:
            raise UnavailableError("not_ready", "no worker has published the categories yet; start `filo worker`")
        try:
            reply = await self.producer.wait_reply(job.request_id, job.deadline - time.monotonic())
        except RedisError as exc:
            raise self._unavailable(exc, queued=True) from None
        if reply is None:
            raise DeadlineExceededError(f"no worker answered request {job.request_id} in time")
        self.waits.observe(reply.queue_wait_ms / 1000.0)
        if reply.error:
            err = reply.error
            raise ServiceError(int(err.get("status", 500)), err.get("code", "inspection_failed"),
                               err.get("message", ""))
        assert reply.result is not None
        return InspectOutcome(result_from_dict(reply.result, reply.anomaly_map), reply.model, reply.queue_wait_ms,
                              reply.model_ms, reply.heatmap)

    async def list_categories(self) -> list[Category]:
        try:
            found = await self.store.all()
        except RedisError as exc:
            raise self._unavailable(exc, queued=False) from None
        return [found[n] for n in sorted(found)]

    async def put_category(self, category: Category) -> CategoryApplied:
        """Store it, then wait (up to `category_apply_timeout_s`) until every live worker has built its
        caches. Workers apply it before their next batch in any case; the wait lets the caller know
        the first request will not pay for it, and the answer says how many were ready."""
        applied = await self._store_and_wait(self.store.put(category))
        await self._write_through()
        return applied

    async def put_extra(self, name: str, kind: str, data: bytes) -> CategoryApplied:
        """Store one per-category extra (references, threshold; it bumps the catalog version) and wait for
        the live workers to apply it, as `put_category` does."""
        applied = await self._store_and_wait(self.store.put_extra(name, kind, data))
        await self._write_through()
        return applied

    async def get_extra(self, name: str, kind: str) -> bytes | None:
        return await RedisExtras(self.store).get(name, kind)

    async def reference_memory_bytes(self, name: str) -> int:
        """The largest few-shot memory the live workers report for the category."""
        return await RedisExtras(self.store).memory_bytes(name)

    @contextlib.asynccontextmanager
    async def category_lock(self, name: str) -> AsyncIterator[None]:
        """A Redis lock shared by every API pod. It lapses after `category_lock_s` in case its holder died; a
        change still waiting for it after that long is refused (409 `category_busy`)."""
        hold_s = self.settings.category_lock_s
        lock = self.redis.lock(self.keys.category_lock(name), timeout=hold_s, blocking_timeout=hold_s)
        try:
            acquired = await lock.acquire()
        except RedisError as exc:
            raise self._unavailable(exc, queued=False) from None
        if not acquired:
            raise ServiceError(409, "category_busy", f"another change of category {name!r} has been running for "
                               f"{hold_s:.0f} s; try again once it is done")
        try:
            yield
        finally:
            with contextlib.suppress(RedisError, LockError):
                await lock.release()

    async def threshold_rule(self, name: str) -> ThresholdRule:
        """The rule the workers resolved when they applied the catalog (`publish_applied`, written before they
        report the version applied, so after a write has waited for them this is the rule of the next
        inspection). Before any worker has: the rule as far as the catalog alone decides it (a references rule
        needs a worker's model, so it shows the default until then)."""
        try:
            extras = RedisExtras(self.store)
            published = await extras.rule(name)
            if published is not None:
                return published
            raw_t, raw_r = await extras.get(name, THRESHOLD_KIND), await extras.get(name, REFERENCES_KIND)
        except RedisError as exc:
            raise self._unavailable(exc, queued=False) from None
        record = ThresholdRecord.from_json(raw_t) if raw_t else None
        refs = ReferenceSet.from_json(raw_r) if raw_r else ReferenceSet()
        default = self.settings.thresholds.get(name, self.settings.default_threshold)
        return resolve(record, refs.digest if len(refs) else "", (), default)

    async def _store_and_wait(self, write: Awaitable[int]) -> CategoryApplied:
        try:
            version = await write
        except CatalogNotPublishedError as exc:
            raise UnavailableError("not_ready", str(exc), retry_after_s=2) from None
        except RedisError as exc:
            raise self._unavailable(exc, queued=False) from None
        try:
            deadline = time.monotonic() + self.settings.category_apply_timeout_s
            while True:
                ready, live = await self.producer.workers_applied(version)
                if ready >= live or time.monotonic() >= deadline:
                    return CategoryApplied(ready, live)
                await asyncio.sleep(0.05)
        except RedisError as exc:
            raise self._unavailable(exc, queued=False) from None

    async def delete_category(self, name: str) -> None:
        try:
            names = [c.name for c in await self.list_categories()]
            if name not in names:
                raise CategoryNotFoundError(name, names)
            await self.store.delete(name)
            await self._write_through()
        except CatalogNotPublishedError as exc:
            raise UnavailableError("not_ready", str(exc), retry_after_s=2) from None
        except RedisError as exc:
            raise self._unavailable(exc, queued=False) from None

    async def refresh_gauges(self) -> None:
        try:
            self.metrics.queue_depth.set(await self.producer.depth())
            self.metrics.workers.set(await self.producer.workers_alive())
            if self.records is not None and self._recorder is not None:
                self.metrics.records_pending.set(len(self.records.buffer) + await self._recorder.pending())
        except RedisError:
            self.metrics.workers.set(0)
