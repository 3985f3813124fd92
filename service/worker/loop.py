"""`filo worker`: load the engine once, then turn stream entries into engine batches, forever.

Beside the loop, a heartbeat every `heartbeat_interval_ms` (`filo_workers` on the API side counts them, and
the API refuses work when none is live) for as long as the worker is idle or its batch has run for less
than the request deadline: a batch stuck longer serves nobody, so its worker stops counting. A worker whose
heartbeat is older than `heartbeat_ttl_ms` is dead to the others: they take its requests over at once.

One loop iteration (see service/queue/protocol.py for the protocol):
1. category sync: if the categories version in Redis moved, apply the difference to the engine and
   persist the caches;
2. take over the entries of workers whose heartbeat lapsed (and remove those workers from the group), and,
   as the backstop, any entry left pending longer than `claim_idle_ms`; each runs in a batch of its own,
   so an entry that kills workers only ever counts against itself;
3. read up to `max_batch_size` new entries (waiting at most `max_wait_ms` after the first);
4. answer without running: malformed entries, entries delivered more than `max_deliveries` times
   (poison) and entries past their deadline; decode and prepare the rest in threads (while the
   previous batch still runs), then run them as ONE engine batch, resetting their idle time
   meanwhile so nobody reclaims a batch that is merely slow;
5. render the heatmap each request asked for (the worker holds the decoded image, so the API never
   decodes it) and encode the replies in threads; reply, acknowledge and delete each entry in one
   transaction.

Healing: if the categories version in Redis disappears (Redis restarted empty, FLUSHALL), the worker
re-publishes the catalog it last applied (`CatalogSnapshot`, see service/catalog/store.py) and its
prompt caches; the consumer group and the heartbeat come back by themselves on the next read/beat.
The CPU of the non-model stages is counted in `filo_worker_cpu_seconds_total{stage}` (decode,
prepare, render, encode) for `filo bench --service`.

The engine runs on one dedicated thread; the event loop keeps serving /healthz, /readyz and
/metrics on `worker_metrics_port` meanwhile. If Redis goes away the loop backs off and retries:
entries stay pending in Redis and are answered after it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from redis.exceptions import RedisError

from service.catalog.references import apply_extras, publish_memory_bytes
from service.catalog.store import CatalogSnapshot, RedisCacheStore, RedisCategoryStore
from service.core.batching import run_isolated
from service.core.errors import IMAGE_ERROR_STATUS, error_from_slot
from service.core.imaging import HeatmapSpec, ImageDecodeError, decode_image
from service.core.keys import Keys
from service.core.redis_client import redis_client
from service.core.telemetry import Metrics
from service.core.types import InspectRequest, InspectResult
from service.engine.device_images import decode_uploads, render, uses_device_path
from service.engine.lifecycle import (
    EngineFactory,
    StartReport,
    apply_categories,
    default_engine_factory,
    persist_caches,
    start_engine,
)
from service.queue.consumer import Consumer
from service.queue.protocol import Entry, Reply, ensure_group, error_dict, result_to_dict, server_time_ms
from service.settings import FiloSettings

log = logging.getLogger(__name__)

IDLE_BLOCK_MS = 1000  # how long one XREADGROUP blocks when the stream is empty (bounds shutdown latency)


def should_beat(batch_started: float | None, now: float, deadline_s: float) -> bool:
    """Alive while idle or while the running batch is younger than a request's whole deadline."""
    return batch_started is None or now - batch_started < deadline_s


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """One inspection worker: an engine, a stream consumer and a health/metrics app."""

    def __init__(self, settings: FiloSettings, engine_factory: EngineFactory | None = None,
                 name: str | None = None) -> None:
        if not settings.redis_url:
            raise ValueError("filo worker needs FILO_REDIS_URL (or --redis-url)")
        self.settings = settings
        self.engine_factory = engine_factory or default_engine_factory
        self.name = name or consumer_name()
        self.metrics = Metrics()
        self.redis = redis_client(settings.redis_url, max(IDLE_BLOCK_MS, settings.max_wait_ms) / 1000, retries=3)
        self.keys = Keys.from_settings(settings)
        self.consumer = Consumer(self.redis, settings, self.name)
        self.store = RedisCategoryStore(self.redis, self.keys)
        self.caches = RedisCacheStore(self.redis, self.keys)
        self.stage_cpu = Counter("filo_worker_cpu_seconds_total", "worker CPU outside the model, by stage",
                                 ["stage"], registry=self.metrics.registry)
        self.engine: Any = None
        self.report: StartReport | None = None
        self.fatal: BaseException | None = None
        self.redis_ok = False
        self.batches = 0
        self.republished = 0  # times this worker re-published the catalog into an emptied Redis
        self._snapshot: CatalogSnapshot | None = None
        self._categories_version = -1
        self._last_claim = 0.0
        self._last_take_over = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="filo-engine")
        self._inflight: asyncio.Task | None = None  # the batch running on the engine thread
        self._batch_started: float | None = None  # monotonic start of the engine run in progress
        self.stopping = asyncio.Event()

    # --- engine thread ------------------------------------------------------------------------------
    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the engine, restore caches from Redis (or build and persist them), warm up."""
        await self._wait_for_redis()
        if self.stopping.is_set():
            return
        await ensure_group(self.redis, self.keys)
        engine = await self._run(self.engine_factory, self.settings)
        self.report = await start_engine(engine, self.store, self.caches, self._run)
        self._categories_version = self.report.categories_version
        self._snapshot = await self.store.snapshot()
        await self._apply_references(engine, self._snapshot.extras)
        await self.consumer.report_applied(self._categories_version)
        self.engine = engine
        self.metrics.workers.set(1)
        log.info("worker %s ready (cache %s)", self.name, self.report.cache_source)

    async def _wait_for_redis(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.redis.ping()
                self.redis_ok = True
                return
            except RedisError as exc:
                self.redis_ok = False
                log.warning("Redis unreachable (%s); retrying", exc)
                await self._sleep(1.0)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def run(self) -> None:
        """Start, then loop until `stopping` is set; Redis outages are waited out, not fatal."""
        try:
            await self.start()
        except Exception as exc:
            self.fatal = exc
            raise
        beating = asyncio.get_running_loop().create_task(self._beat())
        try:
            await self._loop()
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
        if self.engine is not None:
            with contextlib.suppress(RedisError):
                await self.drain()  # finish and answer the batch in flight before leaving
                await self.consumer.leave()

    async def _beat(self) -> None:
        while not self.stopping.is_set():
            if should_beat(self._batch_started, time.monotonic(), self.settings.request_timeout_s):
                with contextlib.suppress(RedisError):  # the loop reports and waits out Redis outages
                    await self.consumer.heartbeat()
            await self._sleep(self.settings.heartbeat_interval_ms / 1000)

    async def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.step()
                self.redis_ok = True
            except RedisError as exc:
                self.redis_ok = False
                log.warning("Redis error in the worker loop (%s); retrying in 1 s", exc)
                await self._sleep(1.0)

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
        await self.redis.aclose()

    # --- one iteration ---------------------------------------------------------------------------------
    async def step(self) -> None:
        await self._sync_categories()
        for entry in await self._rescue():
            log.warning("reclaimed %s (request %s, delivery %d)", entry.entry_id, entry.request_id, entry.deliveries)
            await self.process([entry])  # alone: a suspect must not take neighbours down with it
        batch = await self.consumer.read_batch(self.settings.max_batch_size, self.settings.max_wait_ms,
                                               IDLE_BLOCK_MS)
        if batch:
            await self.process(batch)

    async def _rescue(self) -> list[Entry]:
        """Entries other workers left pending: those of workers whose heartbeat lapsed at once (looked for a few
        times per heartbeat interval), and, as the backstop, any entry idle longer than `claim_idle_ms`."""
        now, rescued = time.monotonic(), []
        if now - self._last_take_over >= self.settings.heartbeat_interval_ms / 4000:
            self._last_take_over = now
            taken = await self.consumer.take_over(self.settings.max_batch_size)
            for name in taken.gone:
                log.warning("worker %s: heartbeat lapsed; its requests taken over, removed from the group", name)
            rescued += taken.entries
        if now - self._last_claim >= min(1.0, self.settings.claim_idle_ms / 2000):
            self._last_claim = now
            rescued += await self.consumer.claim(self.settings.max_batch_size)
        return rescued

    async def _sync_categories(self) -> None:
        version = await self.store.version()
        if version == self._categories_version:
            return
        if version == 0 and self._snapshot is not None:
            await self._republish()
            return
        if 0 < version < self._categories_version and self._snapshot is not None:
            self.metrics.catalog_regressions.inc()
            log.error("CATALOG VERSION WENT BACKWARDS in Redis (%d, this worker applied %d): Redis lost the catalog "
                      "and an older one was published; re-publishing the one applied here", version,
                      self._categories_version)
            await self._republish()
            return
        snap = await self.store.snapshot()
        changed = await self._run(apply_categories, self.engine, snap.categories)
        await self._apply_references(self.engine, snap.extras)
        if changed:
            log.info("categories changed (version %d): %s", snap.version, ", ".join(changed))
            await persist_caches(self.engine, self.caches, self._run)
        self._snapshot = snap
        self._categories_version = snap.version
        await self.consumer.report_applied(snap.version)

    async def _apply_references(self, engine: Any, extras: dict[str, dict[str, bytes]]) -> None:
        """The catalog's normal references and thresholds onto the engine (service/catalog/references.py)."""
        sizes = await self._run(apply_extras, engine, extras)
        await publish_memory_bytes(self.redis, self.keys, sizes)

    async def _republish(self) -> None:
        """Redis holds no catalog any more: publish the last one applied here, and the prompt caches."""
        assert self._snapshot is not None
        version = await self.store.restore(self._snapshot)
        if version:
            self.republished += 1
            self.metrics.catalog_restores.labels(source="worker").inc()
            log.warning("Redis lost the category catalog; re-published %d categories from this worker "
                        "(version %d)", len(self._snapshot.categories), version)
            await persist_caches(self.engine, self.caches, self._run)
        await self._sync_categories()  # another worker may have won the race: apply whatever is there now

    async def _refuse(self, entry: Entry, code: str, message: str, status: int) -> None:
        self.metrics.error(code)
        await self.consumer.answer(entry, Reply(entry.request_id, error=error_dict(code, message, status)))

    async def process(self, entries: list[Entry]) -> None:
        """Answer every entry: refuse what must not run, run the rest as one engine batch.

        Decoding and resizing (tens of ms of CPU per camera image) happen in parallel threads while
        the previous batch still runs on the engine thread; only then does this batch wait for that
        one and start, so the accelerator is not left idle while the CPU prepares its next batch.
        """
        keeper = asyncio.get_running_loop().create_task(self._keep_claimed([e.entry_id for e in entries]))
        try:
            await self._sync_categories()  # a PUT may have landed while this worker blocked on the read
            runnable = await self._prepare(entries)
            await self.drain()
        except BaseException:
            keeper.cancel()
            raise
        if runnable:
            self._inflight = asyncio.get_running_loop().create_task(self._run_batch(runnable, keeper))
        else:
            keeper.cancel()

    async def drain(self) -> None:
        """Wait until the batch in flight (if any) has run and been answered."""
        task, self._inflight = self._inflight, None
        if task is not None:
            await task

    async def _prepare(self, entries: list[Entry]) -> list[tuple[Entry, InspectRequest]]:
        now_ms = await server_time_ms(self.redis)
        to_decode: list[Entry] = []
        for e in entries:
            if e.malformed:
                await self._refuse(e, "malformed_request", e.malformed, 422)
            elif e.deliveries > self.settings.max_deliveries:
                await self._refuse(e, "poison_request", f"request {e.request_id} was delivered {e.deliveries} times "
                                   "and crashed its workers each time; it is failed, not retried", 500)
            elif now_ms >= e.deadline_ms:
                await self._refuse(e, "deadline_exceeded", "deadline passed while queued; not run", 504)
            else:
                to_decode.append(e)
        if uses_device_path(self.settings.gpu_image_path, self.engine.device):
            prepared = await asyncio.to_thread(self._decode_and_prepare_on_device, to_decode)
        else:
            prepared = await asyncio.gather(*(asyncio.to_thread(self._decode_and_prepare, e) for e in to_decode))
        runnable: list[tuple[Entry, InspectRequest]] = []
        for e, req in zip(to_decode, prepared, strict=True):
            if isinstance(req, ImageDecodeError):  # truncated files and bombs stop here, before any batch
                await self._refuse(e, req.code, req.message, IMAGE_ERROR_STATUS.get(req.code, 422))
            else:
                runnable.append((e, req))
        return runnable

    def _count_cpu(self, stage: str, since: float) -> float:
        now = time.thread_time()
        self.stage_cpu.labels(stage=stage).inc(now - since)
        return now

    def _decode_and_prepare(self, e: Entry) -> InspectRequest | ImageDecodeError:
        """In a worker thread: bytes -> image -> model input. A failure to prepare is left to the engine,
        which isolates it in the batch. The only decode of the image in the whole service path."""
        t = time.thread_time()
        try:
            image = decode_image(e.image, self.settings.max_image_pixels)
        except ImageDecodeError as exc:
            return exc
        finally:
            t = self._count_cpu("decode", t)
        try:
            return self._prepare_request(e, image)
        finally:
            self._count_cpu("prepare", t)

    def _decode_and_prepare_on_device(self, entries: list[Entry]) -> list[InspectRequest | ImageDecodeError]:
        """In one worker thread: the whole batch's JPEGs decoded by one nvJPEG call, resized on the GPU
        (FILO_GPU_IMAGE_PATH); others take the CPU path here, image by image."""
        t = time.thread_time()
        images = decode_uploads([e.image for e in entries], self.settings.max_image_pixels, self.engine.device)
        t = self._count_cpu("decode", t)
        try:
            return [img if isinstance(img, ImageDecodeError) else self._prepare_request(e, img)
                    for e, img in zip(entries, images, strict=True)]
        finally:
            self._count_cpu("prepare", t)

    def _prepare_request(self, e: Entry, image: Any) -> InspectRequest:
        p = e.params
        req = InspectRequest(image=image, category=str(p.get("category")),
                             top_k=int(p.get("top_k") or self.settings.top_k), grounding=p.get("grounding"))
        try:
            return self.engine.prepare(req)
        except Exception:  # the engine meets the same failure and reports it for this request alone
            return req

    def _reply_bytes(self, e: Entry, req: InspectRequest, value: Any, model: dict[str, Any], wait_s: float,
                     model_s: float) -> bytes:
        """In a worker thread: the heatmap the request asked for, then the encoded reply."""
        reply = Reply(e.request_id, model=model, queue_wait_ms=wait_s * 1e3, model_ms=model_s * 1e3)
        if isinstance(value, InspectResult):
            reply.result = result_to_dict(value)
            spec = HeatmapSpec.from_dict(e.params.get("heatmap"))
            if spec.wanted:
                t = time.thread_time()
                valid = [b for b in value.boxes if b.valid]
                try:
                    reply.heatmap = render(req.image, value.anomaly_map, spec,
                                                   [(b.x1, b.y1, b.x2, b.y2) for b in valid],
                                                   [b.frame for b in valid])
                finally:
                    self._count_cpu("render", t)
            if e.params.get("want_map", False):
                reply.anomaly_map = value.anomaly_map
                reply.map_encoding = str(e.params.get("map_encoding") or "uint8")
        else:
            err = error_from_slot(value)
            self.metrics.error(err.code)
            reply.error = error_dict(err.code, err.message, err.status)
        t = time.thread_time()
        try:
            return reply.encode()
        finally:
            self._count_cpu("encode", t)

    async def _run_batch(self, runnable: list[tuple[Entry, InspectRequest]], keeper: asyncio.Task) -> None:
        """Run and answer one batch; never raises (nobody awaits it until the next batch, which must not
        inherit its failure). Entries it could not answer stay pending and are reclaimed."""
        try:
            await self._run_and_answer(runnable, keeper)
        except Exception:
            keeper.cancel()
            log.exception("batch of %d could not be answered; its entries stay pending for reclaiming",
                          len(runnable))

    async def _run_and_answer(self, runnable: list[tuple[Entry, InspectRequest]], keeper: asyncio.Task) -> None:
        try:
            start_ms = await server_time_ms(self.redis)
        except RedisError:  # only the queue-wait figure depends on it
            start_ms = max(e.enqueued_ms for e, _ in runnable)
        t0 = self._batch_started = time.monotonic()
        try:
            results = await self._run(run_isolated, self.engine.inspect_batch, [r for _, r in runnable])
        finally:
            self._batch_started = None
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError):
                await keeper
        model_s = time.monotonic() - t0
        self.batches += 1
        waits = [max(0.0, (start_ms - e.enqueued_ms) / 1000) for e, _ in runnable]
        self.metrics.observe_batch(len(runnable), model_s, waits)
        self.metrics.update_gpu_memory(str(self.engine.device))
        model = self.engine.model_info()
        replies = await asyncio.gather(*(
            asyncio.to_thread(self._reply_bytes, e, req, value, model, wait, model_s)
            for (e, req), value, wait in zip(runnable, results, waits, strict=True)), return_exceptions=True)
        for (e, _), reply in zip(runnable, replies, strict=True):
            if isinstance(reply, BaseException):  # rendering failed: the result is lost to this request alone
                log.error("could not build the reply of %s: %r", e.request_id, reply)
                reply = Reply(e.request_id, error=error_dict("inspection_failed", f"building the answer failed: "
                                                             f"{type(reply).__name__}", 500)).encode()
            await self.consumer.answer(e, reply)

    async def _keep_claimed(self, entry_ids: list[str]) -> None:
        """While a batch runs, reset its entries' idle time so a slow batch is not reclaimed."""
        period = max(0.05, self.settings.claim_idle_ms / 3000)
        while True:
            await asyncio.sleep(period)
            await self.consumer.touch(entry_ids)

    # --- health app ----------------------------------------------------------------------------------
    def health_app(self) -> FastAPI:
        """/healthz, /readyz and /metrics of this worker (no auth: for probes and Prometheus)."""
        app = FastAPI(title="FiLo Inspect worker", openapi_url=None, docs_url=None, redoc_url=None)

        @app.get("/healthz")
        async def healthz() -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/readyz")
        async def readyz() -> JSONResponse:
            ready = self.engine is not None and self.redis_ok and self.fatal is None
            detail: dict[str, Any] = {"worker": self.name, "redis": "ok" if self.redis_ok else "unreachable",
                                      "batches": self.batches, "catalog_republished": self.republished}
            if self.report is not None:
                detail.update(self.report.__dict__)
            if self.fatal is not None:
                detail["error"] = str(self.fatal)
            return JSONResponse({"ready": ready, "mode": "worker", "detail": detail}, status_code=200 if ready else 503)

        @app.get("/metrics")
        async def metrics() -> Response:
            with contextlib.suppress(RedisError):
                self.metrics.queue_depth.set(await self.redis.xlen(self.keys.stream))
            data, ctype = self.metrics.render()
            return Response(data, media_type=ctype)

        return app


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the worker decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run_worker(worker: Worker, host: str, port: int) -> int:
    """Serve the health app and run the worker until it is told to stop; the exit status."""
    config = uvicorn.Config(worker.health_app(), host=host, port=port, log_level="warning", lifespan="off")
    server = QuietServer(config)
    serve = asyncio.get_running_loop().create_task(server.serve())
    status = 0
    try:
        await worker.run()
    except Exception as exc:
        log.error("worker failed: %s", exc)
        status = 2
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serve, 5)
        await worker.close()
    return status
