"""The two ways an API process gets inspections done, behind one interface the routes use.

* `EmbeddedBackend` (`filo serve --embedded`): the engine lives in this process; an asyncio
  micro-batcher feeds it on one thread. Categories and caches persist under `state_dir`.
* `RedisBackend` (`filo serve` with `redis_url`): requests go through a Redis stream to
  `filo worker` processes (see service/queue/streams.py); categories and caches live in Redis.

Both answer `inspect` with an `InspectOutcome` or raise a `ServiceError` with its HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from descriptions import Category
from service.api.errors import (
    IMAGE_ERROR_STATUS,
    CategoryNotFoundError,
    DeadlineExceededError,
    QueueFullError,
    ServiceError,
    UnavailableError,
)
from service.catalog.references import FileExtras, apply_extras
from service.catalog.store import (
    CatalogNotPublishedError,
    DiskCacheStore,
    FileCategoryStore,
    RedisCategoryStore,
    StartReport,
    apply_categories,
    default_state_dir,
    persist_caches,
    start_engine,
)
from service.core.batching import MicroBatcher
from service.core.imaging import Heatmap, HeatmapSpec, ImageDecodeError
from service.core.retry_after import QueueWaitEstimate
from service.core.telemetry import Metrics
from service.core.types import InspectError, InspectRequest, InspectResult
from service.engine.device_images import decode_uploads, render, uses_device_path
from service.queue.streams import (
    NO_WORKERS,
    NOT_SEEDED,
    QUEUE_FULL,
    UNKNOWN_CATEGORY,
    Job,
    Keys,
    Producer,
    ensure_group,
    result_from_dict,
)
from service.settings import FiloSettings

log = logging.getLogger(__name__)

EngineFactory = Callable[[FiloSettings], Any]


@dataclass
class InspectJob:
    """One validated request: its original bytes, and the decoded image where this process decodes
    (embedded; `Backend.decodes_in_process`). Queue mode leaves decoding to the worker: one decode."""

    request_id: str
    category: str
    image: np.ndarray | None
    image_bytes: bytes
    top_k: int
    grounding: bool | None
    heatmap: HeatmapSpec
    deadline: float  # time.monotonic() by which an answer is due
    want_map: bool = False  # also return the map itself (queue mode: compact, see service/queue/streams.py)


@dataclass
class InspectOutcome:
    result: InspectResult
    model: dict[str, Any]
    queue_wait_ms: float
    model_ms: float
    heatmap: Heatmap | None = None  # rendered as the job's HeatmapSpec asked


@dataclass
class CategoryApplied:
    """Who has built a registered category's caches when PUT answers (queue mode counts workers)."""

    workers_ready: int | None = None
    workers_live: int | None = None


@dataclass
class Readiness:
    ready: bool
    detail: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    mode: str
    decodes_in_process: bool  # True: the route hands over decoded pixels; False: validated bytes only
    metrics: Metrics
    fatal: BaseException | None

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def readiness(self) -> Readiness: ...
    async def inspect(self, job: InspectJob) -> InspectOutcome: ...
    async def list_categories(self) -> list[Category]: ...
    async def put_category(self, category: Category) -> CategoryApplied: ...
    async def put_extra(self, name: str, kind: str, data: bytes) -> CategoryApplied: ...
    async def delete_category(self, name: str) -> None: ...
    async def refresh_gauges(self) -> None: ...


def error_from_slot(value: BaseException) -> ServiceError:
    """What a failed slot of a batch means for its HTTP caller."""
    if isinstance(value, ServiceError):
        return value
    if isinstance(value, InspectError):
        return ServiceError(value.status, value.code, value.message)
    return ServiceError(500, "inspection_failed", f"the model failed on this request: {type(value).__name__}")


def default_engine_factory(settings: FiloSettings) -> Any:
    try:
        from service.engine.pipeline import InspectionEngine  # torch: only processes that run the model import it
    except ImportError as exc:  # the slim API install has no torch
        raise RuntimeError(f"running the model needs the 'model' extra (pip install 'filo-inspect[model]'): {exc}") from exc

    return InspectionEngine.from_settings(settings)


class EmbeddedBackend:
    """The engine in this process, fed by a micro-batcher; needs no Redis."""

    mode = "embedded"
    decodes_in_process = True

    def __init__(self, settings: FiloSettings, engine_factory: EngineFactory | None = None,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        # with the GPU image path the route hands over the checked bytes and this backend decodes them
        self.decodes_in_process = not settings.gpu_image_path
        self.metrics = metrics or Metrics()
        self.engine_factory = engine_factory or default_engine_factory
        state_dir = settings.state_dir or default_state_dir()
        self.store = FileCategoryStore(state_dir / "categories.json")
        self.caches = DiskCacheStore(state_dir / "caches")
        self.extras = FileExtras(state_dir / "category-extras")
        self.engine: Any = None
        self.report: StartReport | None = None
        self.fatal: BaseException | None = None
        self._batcher: MicroBatcher | None = None
        self._load_task: asyncio.Task | None = None
        self._category_lock = asyncio.Lock()

    async def start(self) -> None:
        self._batcher = MicroBatcher(
            self._run_batch,
            max_batch_size=self.settings.max_batch_size,
            max_wait_ms=self.settings.max_wait_ms,
            max_depth=self.settings.queue_max_depth,
            on_batch=self._observe,
        )
        self._batcher.start()
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="filo-engine-load")

    async def _load(self) -> None:
        """Load, restore caches, warm up: in the background so /healthz answers meanwhile."""
        assert self._batcher is not None
        try:
            engine = await self._batcher.run_exclusive(self.engine_factory, self.settings)
            self.report = await start_engine(engine, self.store, self.caches, self._batcher.run_exclusive)
            extras = await self.extras.all(engine.catalog.names())  # normal references, thresholds (issue 10)
            await self._batcher.run_exclusive(apply_extras, engine, extras)
            self.engine = engine
        except Exception as exc:  # reported by /readyz and by `filo serve`, which exits
            log.exception("the engine failed to start")
            self.fatal = exc

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self._batcher is not None:
            await self._batcher.stop()

    def _run_batch(self, requests: list[InspectRequest]) -> list[Any]:
        return self.engine.inspect_batch(requests)

    def _decode_on_device(self, data: bytes) -> Any:
        """In the request's thread: nvJPEG on the engine's GPU where possible, else the CPU decode."""
        on = uses_device_path(self.settings.gpu_image_path, self.engine.device)
        image = decode_uploads([data], self.settings.max_image_pixels, self.engine.device if on else None)[0]
        if isinstance(image, ImageDecodeError):
            raise ServiceError(IMAGE_ERROR_STATUS.get(image.code, 422), image.code, image.message)
        return image

    def _observe(self, size: int, run_s: float, waits: list[float]) -> None:
        self.metrics.observe_batch(size, run_s, waits)
        self.metrics.update_gpu_memory(str(self.engine.device))

    def _require_ready(self) -> None:
        if self.fatal is not None:
            raise UnavailableError("not_ready", f"the engine failed to start: {self.fatal}")
        if self.engine is None or self._batcher is None:
            raise UnavailableError("not_ready", "the model is still loading")

    async def readiness(self) -> Readiness:
        if self.fatal is not None:
            return Readiness(False, {"error": str(self.fatal)})
        if self.engine is None:
            return Readiness(False, {"loading": True})
        assert self.report is not None
        return Readiness(True, {"device": str(self.engine.device), **self.report.__dict__})

    async def inspect(self, job: InspectJob) -> InspectOutcome:
        self._require_ready()
        assert self._batcher is not None
        if job.category not in self.engine.catalog:
            raise CategoryNotFoundError(job.category, self.engine.catalog.names())
        image = job.image
        if image is None:  # the GPU image path: this backend decodes (service/engine/device_images.py)
            image = await asyncio.to_thread(self._decode_on_device, job.image_bytes)
        request = InspectRequest(image=image, category=job.category, top_k=job.top_k, grounding=job.grounding)
        # resize in this request's thread, not on the batch thread: other batches run meanwhile
        with contextlib.suppress(Exception):  # the engine meets it again and fails this request alone
            request = await asyncio.to_thread(self.engine.prepare, request)
        done = await self._batcher.submit(request, job.deadline)
        if isinstance(done.value, BaseException):
            raise error_from_slot(done.value)
        result: InspectResult = done.value
        heatmap = None
        if job.heatmap.wanted:
            valid = [b for b in result.boxes if b.valid]
            heatmap = await asyncio.to_thread(render, image, result.anomaly_map, job.heatmap,
                                              [(b.x1, b.y1, b.x2, b.y2) for b in valid], [b.frame for b in valid])
        return InspectOutcome(result, self.engine.model_info(), done.queue_wait_s * 1e3, done.run_s * 1e3, heatmap)

    async def list_categories(self) -> list[Category]:
        self._require_ready()
        catalog = self.engine.catalog
        return [catalog.get(n) for n in catalog.names()]

    async def put_extra(self, name: str, kind: str, data: bytes) -> CategoryApplied:
        """Persist one per-category extra (references, threshold), then apply every extra to the engine
        between batches, so the next inspection already sees it."""
        self._require_ready()
        assert self._batcher is not None and self.engine is not None
        async with self._category_lock:
            await self.extras.put(name, kind, data)
            extras = await self.extras.all(self.engine.catalog.names())
            await self._batcher.run_exclusive(apply_extras, self.engine, extras)
        return CategoryApplied()

    async def put_category(self, category: Category) -> CategoryApplied:
        """Persist, then register and build its caches (on the engine thread, between batches)."""
        self._require_ready()
        assert self._batcher is not None
        async with self._category_lock:
            await self.store.put(category)
            await self._batcher.run_exclusive(apply_categories, self.engine, await self.store.all())
            await persist_caches(self.engine, self.caches, self._batcher.run_exclusive)
        return CategoryApplied()

    async def delete_category(self, name: str) -> None:
        self._require_ready()
        assert self._batcher is not None
        async with self._category_lock:
            if name not in self.engine.catalog:
                raise CategoryNotFoundError(name, self.engine.catalog.names())
            await self.store.delete(name)
            await self.extras.delete(name)
            await self._batcher.run_exclusive(apply_categories, self.engine, await self.store.all(), False)
            extras = await self.extras.all(self.engine.catalog.names())
            await self._batcher.run_exclusive(apply_extras, self.engine, extras)

    async def refresh_gauges(self) -> None:
        self.metrics.queue_depth.set(self._batcher.depth if self._batcher else 0)
        self.metrics.workers.set(1 if self.engine is not None else 0)
        if self.engine is not None:
            self.metrics.update_gpu_memory(str(self.engine.device))


def redis_client(url: str, longest_block_s: float = 1.0, retries: int = 0) -> Redis:
    """Binary-safe client; connects fail fast (503) instead of hanging a request when Redis is down.

    The read timeout must outlast the longest blocking command sent on it (BLPOP up to the request
    deadline, XREADGROUP BLOCK), or redis-py reports a healthy wait as a timeout. `retries` retries a
    command on a fresh connection after a connection error: after Redis restarts, every pooled
    connection is stale and fails once (workers use it; the API answers 503 at once instead).
    """
    retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries) if retries else None
    return Redis.from_url(url, decode_responses=False, socket_connect_timeout=2.0, socket_keepalive=True,
                          socket_timeout=longest_block_s + 5.0, retry=retry)


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

    async def start(self) -> None:
        try:
            await ensure_group(self.redis, self.keys)
        except RedisError as exc:  # not fatal: /readyz says so, requests get 503 until Redis is back
            log.warning("Redis unreachable at start (%s); will keep trying per request", exc)

    async def stop(self) -> None:
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
        return await self._store_and_wait(self.store.put(category))

    async def put_extra(self, name: str, kind: str, data: bytes) -> CategoryApplied:
        """Store one per-category extra (references, threshold; it bumps the catalog version) and wait for
        the live workers to apply it, as `put_category` does."""
        return await self._store_and_wait(self.store.put_extra(name, kind, data))

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
        except CatalogNotPublishedError as exc:
            raise UnavailableError("not_ready", str(exc), retry_after_s=2) from None
        except RedisError as exc:
            raise self._unavailable(exc, queued=False) from None

    async def refresh_gauges(self) -> None:
        try:
            self.metrics.queue_depth.set(await self.producer.depth())
            self.metrics.workers.set(await self.producer.workers_alive())
        except RedisError:
            self.metrics.workers.set(0)
