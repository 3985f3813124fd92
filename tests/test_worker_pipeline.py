"""Images are prepared (decode + resize) off the batch thread: by the worker while its previous batch
runs, by the in-process server in each request's thread."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
from PIL import Image
from redis.asyncio import Redis

from service.backends.base import InspectJob
from service.backends.embedded import EmbeddedBackend
from service.core.imaging import HeatmapSpec
from service.core.keys import Keys
from service.engine.pipeline import InspectionEngine
from service.queue.producer import Producer
from service.queue.protocol import Job
from service.worker.loop import Worker, should_beat
from tests.service_fixtures import demo_settings, png_bytes, redis_server, redis_url  # noqa: F401

pytestmark = pytest.mark.redis


class _Timeline:
    """Wraps an engine to record when batches run and when requests are prepared (monotonic seconds)."""

    def __init__(self, engine: InspectionEngine, batch_s: float) -> None:
        self.engine = engine
        self.batch_s = batch_s
        self.recording = False
        self.runs: list[tuple[float, float, int]] = []
        self.prepares: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        inspect, prepare = engine.inspect_batch, engine.prepare

        def slow_inspect(reqs):
            t0 = time.monotonic()
            if self.recording:
                time.sleep(self.batch_s)  # stands in for an accelerator that takes this long per batch
            out = inspect(reqs)
            if self.recording:
                with self.lock:
                    self.runs.append((t0, time.monotonic(), len(reqs)))
            return out

        def timed_prepare(req):
            if self.recording:
                with self.lock:
                    self.prepares.append((time.monotonic(), threading.current_thread().name))
            return prepare(req)

        engine.inspect_batch = slow_inspect
        engine.prepare = timed_prepare


@contextlib.asynccontextmanager
async def running_worker(settings, name: str, batch_s: float) -> AsyncIterator[tuple[Worker, _Timeline, Producer]]:
    """An in-process worker on the demo engine (batches slowed to `batch_s`), recording from its
    first real batch, and a producer on the same Redis, yielded once the worker is live; stopped and closed
    on exit."""
    timeline: list[_Timeline] = []

    def factory(s):
        timeline.append(_Timeline(InspectionEngine.from_settings(s), batch_s))
        return timeline[0].engine

    worker = Worker(settings, engine_factory=factory, name=name)
    running = asyncio.get_running_loop().create_task(worker.run())
    redis = Redis.from_url(settings.redis_url)
    try:
        # loaded, and its first heartbeat written: before it, the producer answers no_workers
        while worker.engine is None or await redis.zscore(Keys.from_settings(settings).workers, name) is None:
            assert not running.done(), running.exception()
            await asyncio.sleep(0.05)
        timeline[0].recording = True
        yield worker, timeline[0], Producer(redis, settings)
    finally:
        worker.stopping.set()
        await asyncio.wait_for(running, 30)
        await worker.close()
        await redis.aclose()


def check_next_batch_prepared_while_one_runs(settings, name: str) -> None:
    """Six requests through a worker whose batches take 0.6 s: batches never overlap on the engine thread,
    and at least two requests are prepared (decoded, resized) while a batch runs."""

    async def main() -> tuple[list, _Timeline]:
        async with running_worker(settings, name, batch_s=0.6) as (worker, timeline, producer):
            assert str(worker.engine.device).startswith(settings.resolved_device())
            ids = [f"req{i}" for i in range(6)]
            for i, rid in enumerate(ids):
                outcome, _ = await producer.enqueue(Job(rid, "bottle", png_bytes(300, 400, seed=i), 60_000, 3))
                assert outcome == "enqueued"
            return [await producer.wait_reply(rid, 60) for rid in ids], timeline

    replies, t = asyncio.run(main())
    assert all(r is not None and r.error is None and r.result is not None for r in replies), replies
    assert sum(n for _, _, n in t.runs) == 6 and len(t.runs) >= 3
    assert all(not name.startswith("filo-engine") for _, name in t.prepares)  # never on the engine thread
    # batches never overlap each other on the engine thread ...
    runs = sorted(t.runs)
    assert all(a_end <= b_start for (_, a_end, _), (b_start, _, _) in itertools.pairwise(runs))
    # ... but the next batch is prepared while one runs
    overlapped = [p for p, _ in t.prepares if any(start < p < end for start, end, _ in runs)]
    assert len(overlapped) >= 2, (runs, t.prepares)


def test_worker_prepares_the_next_batch_while_one_runs(redis_url: str) -> None:  # noqa: F811
    check_next_batch_prepared_while_one_runs(demo_settings(redis_url=redis_url, max_batch_size=2, max_wait_ms=200),
                                             "pipelined")


def test_heartbeat_rule() -> None:
    assert should_beat(None, 100.0, 30.0)  # idle
    assert should_beat(90.0, 100.0, 30.0)  # a batch running for 10 s of a 30 s deadline
    assert not should_beat(60.0, 100.0, 30.0)  # running longer than any request may wait: stuck


def test_worker_keeps_beating_through_a_long_batch(redis_url: str) -> None:  # noqa: F811
    """The API refuses work when no heartbeat is live, so a busy worker must not go quiet."""
    settings = demo_settings(redis_url=redis_url, max_batch_size=1)
    period_s = settings.heartbeat_interval_ms / 1000

    async def main() -> list[float]:
        async with running_worker(settings, "busy", batch_s=period_s * 2.5) as (worker, _, producer):
            assert (await producer.enqueue(Job("long", "bottle", png_bytes(), 60_000, 3)))[0] == "enqueued"
            while not (worker._batch_started and time.monotonic() - worker._batch_started > 0.2):
                await asyncio.sleep(0.02)
            beats = []
            for _ in range(2):
                beats.append(await producer.redis.zscore(Keys.from_settings(settings).workers, "busy"))
                await asyncio.sleep(period_s * 1.1)
            assert worker._batch_started is not None, "the batch ended before the second look"
            reply = await producer.wait_reply("long", 60)
            assert reply is not None and reply.error is None
            return beats

    first, second = asyncio.run(main())
    assert second > first  # a beat landed while the engine thread was busy


def test_embedded_backend_prepares_outside_the_batch_thread(tmp_path) -> None:
    """The in-process server resizes in each request's thread, so batches are not held up by it."""
    settings = demo_settings(state_dir=tmp_path)
    timelines: list[_Timeline] = []
    arrived: list[bool] = []

    def factory(s):
        timelines.append(_Timeline(InspectionEngine.from_settings(s), batch_s=0.0))
        inner = timelines[0].engine.inspect_batch

        def spy(reqs):
            arrived.extend(r.pixels is not None for r in reqs)
            return inner(reqs)

        timelines[0].engine.inspect_batch = spy
        return timelines[0].engine

    async def main() -> None:
        backend = EmbeddedBackend(settings, engine_factory=factory)
        await backend.start()
        try:
            while not (await backend.readiness()).ready:
                assert backend.fatal is None, backend.fatal
                await asyncio.sleep(0.05)
            timelines[0].recording = True
            arrived.clear()
            image = np.asarray(Image.open(io.BytesIO(png_bytes(120, 160))).convert("RGB"))
            jobs = [InspectJob(f"e{i}", "bottle", image, b"", 3, None, HeatmapSpec("jpeg", 100), time.monotonic() + 60)
                    for i in range(3)]
            outcomes = await asyncio.gather(*(backend.inspect(j) for j in jobs))
            assert all(o.result.anomaly_map.shape == (224, 224) for o in outcomes)
            assert all((o.heatmap.width, o.heatmap.height) == (100, 75) for o in outcomes)
        finally:
            await backend.stop()

    asyncio.run(main())
    assert arrived == [True, True, True]  # the batch got them prepared (its own pass is then a no-op)
    names = [name for _, name in timelines[0].prepares]
    assert sum(n.startswith("asyncio") for n in names) == 3  # the request threads (asyncio.to_thread)
    assert not any(n.startswith("filo-engine") for n in names)
