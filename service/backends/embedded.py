"""The two ways an API process gets inspections done, behind one interface the routes use.

* `EmbeddedBackend` (`filo serve --embedded`): the engine lives in this process; an asyncio
  micro-batcher feeds it on one thread. Categories and caches persist under `state_dir`.
* `RedisBackend` (`filo serve` with `redis_url`): requests go through a Redis stream to
  `filo worker` processes (see service/queue/protocol.py); categories and caches live in Redis.

Both answer `inspect` with an `InspectOutcome` or raise a `ServiceError` with its HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from descriptions import Category
from service.backends.base import CategoryApplied, InspectJob, InspectOutcome, Readiness
from service.backends.jobs import MemoryJobs
from service.catalog.references import FileExtras, apply_extras, install_extras, plan_extras
from service.catalog.store import DiskCacheStore, FileCategoryStore, default_state_dir
from service.catalog.thresholds import ThresholdRule
from service.core.batching import MicroBatcher
from service.core.errors import (
    CategoryNotFoundError,
    UnavailableError,
    error_from_slot,
    image_error,
)
from service.core.imaging import ImageDecodeError
from service.core.telemetry import Metrics
from service.core.types import InspectRequest, InspectResult
from service.engine import serving
from service.engine.contract import Engine, EngineFactory
from service.engine.lifecycle import (
    StartReport,
    apply_categories,
    default_engine_factory,
    persist_caches,
    start_engine,
)
from service.records.recorder import Records, records_url
from service.settings import FiloSettings

log = logging.getLogger(__name__)



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
        self.jobs = MemoryJobs()
        self.records = (Records(settings, self.metrics, records_url(settings, state_dir),
                                spill_dir=state_dir / "records-spill") if settings.records else None)
        self.engine: Engine | None = None
        self.report: StartReport | None = None
        self.fatal: BaseException | None = None
        self._batcher: MicroBatcher | None = None
        self._load_task: asyncio.Task | None = None
        self._category_lock = asyncio.Lock()
        self._change_locks: dict[str, asyncio.Lock] = {}  # per category: one change of its extras at a time

    async def start(self) -> None:
        self._batcher = MicroBatcher(
            self._run_batch,
            max_batch_size=self.settings.max_batch_size,
            max_wait_ms=self.settings.max_wait_ms,
            max_depth=self.settings.queue_max_depth,
            on_batch=self._observe,
        )
        self._batcher.start()
        if self.records is not None:
            await self.records.start()
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="filo-engine-load")

    async def _load(self) -> None:
        """Load, restore caches, warm up: in the background so /healthz answers meanwhile."""
        assert self._batcher is not None
        try:
            engine = await self._batcher.run_exclusive(self.engine_factory, self.settings)
            self.report = await start_engine(engine, self.store, self.caches, self._batcher.run_exclusive)
            self.metrics.set_engine_info(self.report.runtime)
            extras = await self.extras.all(engine.catalog.names())  # normal references, thresholds
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
        if self.records is not None:
            await self.records.stop()

    def _run_batch(self, requests: list[InspectRequest]) -> list[Any]:
        assert self.engine is not None
        return self.engine.inspect_batch(requests)

    def _decode_on_device(self, data: bytes) -> Any:
        """In the request's thread: nvJPEG on the engine's GPU where possible, else the CPU decode."""
        assert self.engine is not None
        image = serving.decode_for(self.engine, [data], self.settings.max_image_pixels, self.settings.gpu_image_path)[0]
        if isinstance(image, ImageDecodeError):
            raise image_error(image)
        return image

    def _observe(self, size: int, run_s: float, waits: list[float]) -> None:
        assert self.engine is not None
        self.metrics.observe_batch(size, run_s, waits)
        self.metrics.update_gpu_memory(str(self.engine.device))

    def _require_ready(self) -> None:
        if self.fatal is not None:
            raise UnavailableError("not_ready", f"the engine failed to start: {self.fatal}")
        if self.engine is None or self._batcher is None:
            raise UnavailableError("not_ready", "the model is still loading")

    async def readiness(self) -> Readiness:
        """The engine decides; the records' state is shown (`degraded` with its cause while writes fail), never
        decisive: inspections are answered while records wait in the buffer."""
        records = {"records": self.records.state()} if self.records is not None else {}
        if self.fatal is not None:
            return Readiness(False, {"error": str(self.fatal), **records})
        if self.engine is None:
            return Readiness(False, {"loading": True, **records})
        assert self.report is not None
        return Readiness(True, {"device": str(self.engine.device), **self.report.__dict__, **records})

    async def inspect(self, job: InspectJob) -> InspectOutcome:
        """The serving steps the queue worker runs too (service/engine/serving.py), around this process's batcher."""
        self._require_ready()
        assert self._batcher is not None and self.engine is not None
        if job.category not in self.engine.catalog:
            raise CategoryNotFoundError(job.category, self.engine.catalog.names())
        image = job.image
        if image is None:  # the GPU image path: this backend decodes
            image = await asyncio.to_thread(self._decode_on_device, job.image_bytes)
        request = InspectRequest(image=image, category=job.category, top_k=job.top_k, grounding=job.grounding)
        # resize in this request's thread, not on the batch thread: other batches run meanwhile
        request = await asyncio.to_thread(serving.prepared, self.engine, request)
        done = await self._batcher.submit(request, job.deadline)
        if isinstance(done.value, BaseException):
            raise error_from_slot(done.value)
        result: InspectResult = done.value
        heatmap = await asyncio.to_thread(serving.result_heatmap, image, result, job.heatmap) if job.heatmap.wanted \
            else None
        return InspectOutcome(result, self.engine.model_info(), done.queue_wait_s * 1e3, done.run_s * 1e3, heatmap)

    @contextlib.asynccontextmanager
    async def category_lock(self, name: str) -> AsyncIterator[None]:
        """One process holds the whole state: an asyncio lock per category serialises its changes."""
        lock = self._change_locks.setdefault(name, asyncio.Lock())
        async with lock:
            yield

    async def threshold_rule(self, name: str) -> ThresholdRule:
        """The rule this process's engine applies to the category's next inspection (between batches)."""
        self._require_ready()
        assert self._batcher is not None and self.engine is not None
        if name not in self.engine.catalog:
            raise CategoryNotFoundError(name, self.engine.catalog.names())
        return await self._batcher.run_exclusive(self.engine.references.category_rule, name)

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
            await self._apply_extras(extras)
        return CategoryApplied()

    async def _apply_extras(self, extras: dict[str, dict[str, bytes]]) -> None:
        """Reference memories built beside the batches (a thread of their own), then swapped in between two:
        inspections of other categories go on meanwhile."""
        assert self._batcher is not None and self.engine is not None
        plan = await asyncio.to_thread(plan_extras, self.engine, extras)
        await self._batcher.run_exclusive(install_extras, self.engine, plan)

    async def get_extra(self, name: str, kind: str) -> bytes | None:
        return await self.extras.get(name, kind)

    async def reference_memory_bytes(self, name: str) -> int:
        """Bytes of the category's few-shot memory on this process's device (0 before the engine is up)."""
        return self.engine.references.memory_bytes(name) if self.engine is not None else 0

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
            await self._apply_extras(extras)

    async def refresh_gauges(self) -> None:
        self.metrics.queue_depth.set(self._batcher.depth if self._batcher else 0)
        self.metrics.workers.set(1 if self.engine is not None else 0)
        if self.engine is not None:
            self.metrics.update_gpu_memory(str(self.engine.device))


