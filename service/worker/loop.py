"""`filo worker`: load the engine once, then turn stream entries into engine batches, forever.

This module is the batch loop and the worker's lifecycle; its other jobs each have a module of their own:
the heartbeat (heartbeat.py), following and healing the category catalog (catalog_follower.py), taking over
the requests of dead workers (rescue.py), building each answer (replies.py) and the health app (health.py).
The serving steps around the batch (decode, prepare, render) are the embedded server's too
(service/engine/serving.py).

One loop iteration (see service/queue/protocol.py for the protocol):
1. category sync: if the categories version in Redis moved, apply the difference to the engine;
2. take over the entries of workers whose heartbeat lapsed, and, as the backstop, any entry left pending longer
   than `claim_idle_ms`; each runs in a batch of its own, so an entry that kills workers only ever counts
   against itself;
3. read up to `max_batch_size` new entries (waiting at most `max_wait_ms` after the first);
4. answer without running: malformed entries, entries delivered more than `max_deliveries` times (poison) and
   entries past their deadline; decode and prepare the rest in threads (while the previous batch still runs),
   then run them as ONE engine batch, resetting their idle time meanwhile so nobody reclaims a batch that is
   merely slow;
5. build the replies in threads; reply, acknowledge and delete each entry in one transaction.

The engine runs on one dedicated thread; the event loop keeps serving /healthz, /readyz and /metrics on
`worker_metrics_port` meanwhile. If Redis goes away the loop backs off and retries: entries stay pending in
Redis and are answered after it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvicorn
from redis.exceptions import RedisError

from service.core.batching import run_isolated
from service.core.errors import image_error
from service.core.imaging import ImageDecodeError
from service.core.keys import Keys
from service.core.redis_client import redis_client
from service.core.telemetry import Metrics
from service.core.types import InspectRequest
from service.engine import serving
from service.engine.contract import Engine, EngineFactory
from service.engine.lifecycle import StartReport, default_engine_factory, start_engine
from service.queue.consumer import Consumer
from service.queue.protocol import Entry, Reply, ensure_group, error_dict, server_time_ms
from service.settings import FiloSettings
from service.worker.catalog_follower import CatalogFollower
from service.worker.health import QuietServer, health_app
from service.worker.heartbeat import beat_until, should_beat
from service.worker.replies import failed_reply, reply_bytes
from service.worker.rescue import Rescuer
from service.worker.stage_cpu import StageCPU

__all__ = ["Worker", "consumer_name", "run_worker", "should_beat"]

log = logging.getLogger(__name__)

IDLE_BLOCK_MS = 1000  # how long one XREADGROUP blocks when the stream is empty (bounds shutdown latency)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """One inspection worker: an engine, a stream consumer, the catalog it follows, and its batch loop."""

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
        self.catalog = CatalogFollower(self.redis, self.keys, self.consumer, self.metrics, self._run)
        self.rescuer = Rescuer(self.consumer, settings, self.metrics)
        self.cpu = StageCPU(self.metrics)
        self.engine: Engine | None = None
        self.report: StartReport | None = None
        self.fatal: BaseException | None = None
        self.redis_ok = False
        self.batches = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="filo-engine")
        self._inflight: asyncio.Task | None = None  # the batch running on the engine thread
        self._batch_started: float | None = None  # monotonic start of the engine run in progress
        self.stopping = asyncio.Event()

    async def _run(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` on the engine's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the engine, restore caches from Redis (or build and persist them), warm up."""
        await self._wait_for_redis()
        if self.stopping.is_set():
            return
        await ensure_group(self.redis, self.keys)
        engine = await self._run(self.engine_factory, self.settings)
        self.report = await start_engine(engine, self.catalog.store, self.catalog.caches, self._run)
        self.metrics.set_engine_info(self.report.runtime)
        await self.catalog.start(engine, self.report.categories_version)
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
        beating = asyncio.get_running_loop().create_task(beat_until(
            self.stopping, self.consumer, lambda: self._batch_started, self.settings.heartbeat_interval_ms / 1000,
            self.settings.request_timeout_s))
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
        await self.catalog.sync()
        for entry in await self.rescuer.due_entries():
            log.warning("reclaimed %s (request %s, delivery %d)", entry.entry_id, entry.request_id, entry.deliveries)
            await self.process([entry])  # alone: a suspect must not take neighbours down with it
        batch = await self.consumer.read_batch(self.settings.max_batch_size, self.settings.max_wait_ms,
                                               IDLE_BLOCK_MS)
        if batch:
            await self.process(batch)

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
            await self.catalog.sync()  # a PUT may have landed while this worker blocked on the read
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
        assert self.engine is not None
        if serving.uses_device_path(self.settings.gpu_image_path, self.engine.device):
            # one thread: the whole batch's JPEGs in one nvJPEG call
            prepared = await asyncio.to_thread(self._decode_and_prepare, to_decode)
        else:  # a thread per image: PIL and the resize release the GIL
            prepared = [r for done in await asyncio.gather(
                *(asyncio.to_thread(self._decode_and_prepare, [e]) for e in to_decode)) for r in done]
        runnable: list[tuple[Entry, InspectRequest]] = []
        for e, req in zip(to_decode, prepared, strict=True):
            if isinstance(req, ImageDecodeError):  # truncated files and bombs stop here, before any batch
                err = image_error(req)
                await self._refuse(e, err.code, err.message, err.status)
            else:
                runnable.append((e, req))
        return runnable

    def _decode_and_prepare(self, entries: list[Entry]) -> list[InspectRequest | ImageDecodeError]:
        """In a worker thread: bytes -> image -> model input, by the serving steps the embedded server runs.
        The only decode of the image in the whole service path."""
        assert self.engine is not None
        t = time.thread_time()
        images = serving.decode_for(self.engine, [e.image for e in entries], self.settings.max_image_pixels,
                                    self.settings.gpu_image_path)
        t = self.cpu.count("decode", t)
        try:
            return [img if isinstance(img, ImageDecodeError) else serving.prepared(self.engine, self._request(e, img))
                    for e, img in zip(entries, images, strict=True)]
        finally:
            self.cpu.count("prepare", t)

    def _request(self, e: Entry, image: Any) -> InspectRequest:
        p = e.params
        return InspectRequest(image=image, category=str(p.get("category")),
                              top_k=int(p.get("top_k") or self.settings.top_k), grounding=p.get("grounding"))

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
        assert self.engine is not None
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
            asyncio.to_thread(reply_bytes, e, req, value, model, wait, model_s, self.metrics, self.cpu)
            for (e, req), value, wait in zip(runnable, results, waits, strict=True)), return_exceptions=True)
        for (e, _), reply in zip(runnable, replies, strict=True):
            if isinstance(reply, BaseException):
                log.error("could not build the reply of %s: %r", e.request_id, reply)
                reply = failed_reply(e, reply)
            await self.consumer.answer(e, reply)

    async def _keep_claimed(self, entry_ids: list[str]) -> None:
        """While a batch runs, reset its entries' idle time so a slow batch is not reclaimed."""
        period = max(0.05, self.settings.claim_idle_ms / 3000)
        while True:
            await asyncio.sleep(period)
            await self.consumer.touch(entry_ids)


async def run_worker(worker: Worker, host: str, port: int) -> int:
    """Serve the health app and run the worker until it is told to stop; the exit status."""
    config = uvicorn.Config(health_app(worker), host=host, port=port, log_level="warning", lifespan="off")
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
