"""The pieces under the API, without a model: micro-batcher, stream protocol, stores, metrics."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from redis.asyncio import Redis

from descriptions import Category
from service.catalog.store import (
    DiskCacheStore,
    FileCategoryStore,
    RedisCacheStore,
    RedisCategoryStore,
    pack_cache_state,
    unpack_cache_state,
)
from service.core.batching import MicroBatcher, run_isolated
from service.core.errors import DeadlineExceededError, QueueFullError
from service.core.keys import Keys
from service.core.retry_after import QueueWaitEstimate
from service.core.telemetry import Metrics
from service.core.types import AnomalyType, Box, InspectResult
from service.queue.consumer import Consumer, TakeOver
from service.queue.producer import (
    ENQUEUED,
    NO_WORKERS,
    NOT_SEEDED,
    QUEUE_FULL,
    UNKNOWN_CATEGORY,
    Producer,
)
from service.queue.protocol import Entry, Job, Reply, ensure_group, result_from_dict, result_to_dict
from service.settings import FiloSettings
from tests.service_fixtures import redis_server, redis_url  # noqa: F401

# --- micro-batcher -----------------------------------------------------------------------------------------


def _batcher(fn, **kw) -> MicroBatcher:
    opts = {"max_batch_size": 4, "max_wait_ms": 30, "max_depth": 100}
    opts.update(kw)
    return MicroBatcher(fn, **opts)


def test_batches_up_to_n_and_runs_off_the_event_loop() -> None:
    calls: list[list[int]] = []
    threads: set[str] = set()

    def double(items: list[int]) -> list[int]:
        calls.append(list(items))
        threads.add(threading.current_thread().name)
        time.sleep(0.05)
        return [2 * i for i in items]

    async def main() -> None:
        b = _batcher(double)
        b.start()
        deadline = time.monotonic() + 10
        ticks = 0

        async def ticker() -> None:  # the loop must stay responsive while batches run
            nonlocal ticks
            for _ in range(20):
                await asyncio.sleep(0.01)
                ticks += 1

        done, _ = await asyncio.gather(asyncio.gather(*(b.submit(i, deadline) for i in range(10))), ticker())
        assert [d.value for d in done] == [2 * i for i in range(10)]
        assert ticks == 20
        await b.stop()

    asyncio.run(main())
    assert sum(len(c) for c in calls) == 10
    assert max(len(c) for c in calls) == 4  # N bounds a batch
    assert len(calls) <= 4
    assert all(name.startswith("filo-engine") for name in threads)


def test_waits_at_most_t_ms_for_more() -> None:
    def ident(items: list[int]) -> list[int]:
        return items

    async def main() -> float:
        b = _batcher(ident, max_batch_size=64, max_wait_ms=50)
        b.start()
        t0 = time.monotonic()
        r = await b.submit(1, time.monotonic() + 10)
        await b.stop()
        assert r.batch_size == 1
        return time.monotonic() - t0

    assert asyncio.run(main()) < 1.0


def test_queue_full_and_deadline() -> None:
    release = threading.Event()

    def slow(items: list[int]) -> list[int]:
        release.wait(5)
        return items

    async def main() -> None:
        b = _batcher(slow, max_batch_size=1, max_wait_ms=0, max_depth=1)
        b.start()
        first = asyncio.ensure_future(b.submit(1, time.monotonic() + 10))
        await asyncio.sleep(0.1)  # `first` is running; the queue is empty again
        second = asyncio.ensure_future(b.submit(2, time.monotonic() + 0.2))
        await asyncio.sleep(0.01)
        b.waits.observe(7.2)  # queued requests have lately waited 7.2 s
        with pytest.raises(QueueFullError) as full:
            await b.submit(3, time.monotonic() + 10)
        assert full.value.status == 429 and full.value.headers["Retry-After"] == "8"
        with pytest.raises(DeadlineExceededError):
            await second
        release.set()
        assert (await first).value == 1
        await b.stop()

    asyncio.run(main())


def test_retry_after_follows_recent_queue_waits() -> None:
    est = QueueWaitEstimate(weight=0.5, floor_s=1, ceiling_s=60)
    assert est.retry_after_s() == 1  # nothing observed yet
    est.observe(4.0)
    assert est.retry_after_s() == 4
    est.observe(0.0)
    assert est.retry_after_s() == 2  # 4 + 0.5 * (0 - 4)
    est.observe(-3.0)  # clock skew never makes it negative
    assert est.retry_after_s() == 1
    for _ in range(20):
        est.observe(1000.0)
    assert est.retry_after_s() == 60
    with pytest.raises(ValueError):
        QueueWaitEstimate(weight=0.0)


def test_a_crashing_item_fails_alone() -> None:
    def fragile(items: list[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("boom")
        return [i + 1 for i in items]

    out = run_isolated(fragile, [1, 13, 2])
    assert out[0] == 2 and out[2] == 3
    assert isinstance(out[1], RuntimeError)

    async def main() -> None:
        b = _batcher(fragile)
        b.start()
        res = await asyncio.gather(*(b.submit(i, time.monotonic() + 10) for i in (1, 13, 2)))
        assert res[0].value == 2 and res[2].value == 3 and isinstance(res[1].value, RuntimeError)
        assert (await b.submit(5, time.monotonic() + 10)).value == 6  # still serving
        await b.stop()

    asyncio.run(main())


# --- payloads ------------------------------------------------------------------------------------------------


def test_reply_round_trip_keeps_the_map_and_boxes() -> None:
    amap = np.random.default_rng(0).random((7, 7)).astype(np.float32)
    res = InspectResult(0.7, 0.6, 0.8, amap, "top left",
                        [Box(1, 2, 3, 4, "scratch", 0.9, True, (0.1, 0.2, 0.3, 0.4))],
                        [AnomalyType("scratch", 0.3)], {"model": 1.0})
    reply = Reply("r1", result=result_to_dict(res), model={"name": "FiLo"}, queue_wait_ms=3, model_ms=4,
                  anomaly_map=amap, map_encoding="float32")
    back = Reply.decode(reply.encode())
    got = result_from_dict(back.result, back.anomaly_map)
    assert np.array_equal(got.anomaly_map, amap)  # float32 is exact; the compact encodings: tests/test_heatmaps.py
    assert got.score == res.score and got.text_score == res.text_score and got.map_max == res.map_max
    assert got.boxes == res.boxes and got.top_types == res.top_types and got.position == "top left"
    assert back.queue_wait_ms == 3 and back.model == {"name": "FiLo"}
    err = Reply.decode(Reply("r2", error={"code": "x", "message": "y", "status": 500}).encode())
    assert err.error["code"] == "x" and err.anomaly_map is None


def test_malformed_entry_is_flagged_not_raised() -> None:
    e = Entry.parse(b"1-0", {b"reply": b"k"})
    assert e.malformed and e.reply_key == "k"


# --- stream protocol against a real Redis ------------------------------------------------------------------


def _settings(url: str, **kw) -> FiloSettings:
    """Stream tests run without worker heartbeats, so they do not require a live worker to enqueue."""
    return FiloSettings(redis_url=url, **{"claim_idle_ms": 600, "queue_max_depth": 3,
                                          "reject_without_workers": False, **kw})


async def _seeded(url: str) -> tuple[Redis, FiloSettings, Keys]:
    settings = _settings(url)
    r = Redis.from_url(url)
    keys = Keys.from_settings(settings)
    await ensure_group(r, keys)
    await RedisCategoryStore(r, keys).seed([Category(name="bottle", noun="bottle", descriptions=("crack",))])
    return r, settings, keys


def _job(rid: str, category: str = "bottle", timeout_ms: int = 10_000) -> Job:
    return Job(rid, category, b"img-bytes", timeout_ms, 5)


@pytest.mark.redis
def test_enqueue_refuses_unknown_full_and_unseeded(redis_url: str) -> None:  # noqa: F811
    async def main() -> None:
        r = Redis.from_url(redis_url)
        settings = _settings(redis_url)
        p = Producer(r, settings)
        assert (await p.enqueue(_job("a")))[0] == NOT_SEEDED
        await RedisCategoryStore(r, Keys.from_settings(settings)).seed(
            [Category(name="bottle", noun="bottle", descriptions=("crack",))])
        assert (await p.enqueue(_job("a", "nope")))[0] == UNKNOWN_CATEGORY
        for i in range(3):
            assert await p.enqueue(_job(f"j{i}")) == (ENQUEUED, i + 1)
        assert (await p.enqueue(_job("j4")))[0] == QUEUE_FULL
        assert await p.depth() == 3
        await r.aclose()

    asyncio.run(main())


@pytest.mark.redis
def test_enqueue_requires_a_live_worker_unless_told_otherwise(redis_url: str) -> None:  # noqa: F811
    async def main() -> None:
        r, _, _ = await _seeded(redis_url)
        strict = Producer(r, _settings(redis_url, reject_without_workers=True))
        assert await strict.enqueue(_job("a")) == (NO_WORKERS, 0)
        assert await strict.depth() == 0  # refused, not queued
        seconds, micros = await r.time()  # a heartbeat older than the window does not count
        ttl_ms = _settings(redis_url).heartbeat_ttl_ms
        await r.zadd(Keys.from_settings(_settings(redis_url)).workers,
                     {"gone": int(seconds) * 1000 + int(micros) // 1000 - ttl_ms - 1000})
        assert (await strict.enqueue(_job("a")))[0] == NO_WORKERS
        await Consumer(r, _settings(redis_url), "w1").heartbeat()
        assert await strict.enqueue(_job("b")) == (ENQUEUED, 1)
        await r.aclose()

    asyncio.run(main())


@pytest.mark.redis
def test_read_reply_ack_and_reclaim_with_delivery_counts(redis_url: str) -> None:  # noqa: F811
    async def main() -> None:
        r, settings, keys = await _seeded(redis_url)
        p = Producer(r, settings)
        dead = Consumer(r, settings, "dead")
        alive = Consumer(r, settings, "alive")
        await p.enqueue(_job("r1"))
        await p.enqueue(_job("r2"))
        got = await dead.read_batch(8, 20, 100)
        assert [e.request_id for e in got] == ["r1", "r2"] and got[0].deliveries == 1
        assert got[0].deadline_ms == got[0].enqueued_ms + 10_000
        assert await alive.claim(8) == []  # not idle long enough yet
        await asyncio.sleep(0.7)
        claimed = await alive.claim(8)
        assert [e.request_id for e in claimed] == ["r1", "r2"] and claimed[0].deliveries == 2
        await alive.touch([claimed[1].entry_id])
        await alive.answer(claimed[0], Reply("r1", result={"score": 1.0}))
        reply = await p.wait_reply("r1", 2)
        assert reply is not None and reply.result == {"score": 1.0}
        assert await r.ttl(keys.reply("r1")) == -2  # popped
        assert await p.depth() == 1  # answered entries are acknowledged AND deleted
        pending = await r.xpending(keys.stream, keys.group)
        assert pending["pending"] == 1
        assert await p.wait_reply("r2", 0.2) is None  # nothing yet: a timeout, not an error
        await r.aclose()

    asyncio.run(main())


async def _consumers(r: Redis, keys: Keys) -> set[str]:
    return {c["name"].decode() for c in await r.xinfo_consumers(keys.stream, keys.group)}


@pytest.mark.redis
def test_a_lapsed_workers_requests_are_taken_over_once_and_it_leaves_the_group(redis_url: str) -> None:  # noqa: F811
    async def main() -> None:
        r, _, keys = await _seeded(redis_url)
        settings = _settings(redis_url, heartbeat_interval_ms=100, heartbeat_ttl_ms=300)
        p = Producer(r, settings)
        dead, a, b = (Consumer(r, settings, n) for n in ("dead", "a", "b"))
        for c in (dead, a, b):
            await c.heartbeat()
        await dead.report_applied(1)
        for i in range(3):
            await p.enqueue(_job(f"r{i}"))
        assert len(await dead.read_batch(8, 0, 100)) == 3
        assert await a.take_over(8) == TakeOver()  # its heartbeat is live: nothing moves
        await asyncio.sleep(0.35)  # `dead` stops beating, `a` and `b` go on
        for c in (a, b):
            await c.heartbeat()
        assert await p.workers_alive() == 2
        first, second = await asyncio.gather(a.take_over(2), b.take_over(2))  # two survivors at once
        taken = [e for t in (first, second) for e in t.entries]
        assert sorted(e.request_id for e in taken) == ["r0", "r1", "r2"]  # each taken once, none lost
        assert {e.deliveries for e in taken} == {2}
        assert first.gone + second.gone == ["dead"]  # removed once, by whoever took its last request
        assert "dead" not in await _consumers(r, keys)
        assert await r.zscore(keys.workers, "dead") is None and await r.hget(keys.workers_applied, "dead") is None
        owners = {x["consumer"].decode() for x in await r.xpending_range(keys.stream, keys.group, "-", "+", 10)}
        assert owners <= {"a", "b"}
        for t, c in ((first, a), (second, b)):
            for e in t.entries:
                await c.answer(e, Reply(e.request_id, result={"score": 0.0}))
        assert sorted([(await p.wait_reply(f"r{i}", 2)).request_id for i in range(3)]) == ["r0", "r1", "r2"]
        await r.aclose()

    asyncio.run(main())


@pytest.mark.redis
def test_take_over_leaves_what_a_late_but_living_worker_just_read(redis_url: str) -> None:  # noqa: F811
    async def main() -> None:
        r, _, keys = await _seeded(redis_url)
        settings = _settings(redis_url, heartbeat_interval_ms=100, heartbeat_ttl_ms=300)
        p, late, survivor = Producer(r, settings), Consumer(r, settings, "late"), Consumer(r, settings, "survivor")
        await late.heartbeat()
        await p.enqueue(_job("r0"))
        await asyncio.sleep(0.35)  # `late` misses its beats ...
        await survivor.heartbeat()
        (entry,) = await late.read_batch(1, 0, 100)  # ... but is alive and has just read a request
        assert await survivor.take_over(8) == TakeOver()  # not alone long enough: it stays, and so does `late`
        assert await late.take_over(8) == TakeOver()  # nobody takes over from itself
        assert "late" in await _consumers(r, keys)
        await asyncio.sleep(0.15)  # left alone past a heartbeat interval: now it moves
        await survivor.heartbeat()
        moved = await survivor.take_over(8)
        assert [e.request_id for e in moved.entries] == ["r0"] and moved.gone == ["late"]
        await late.answer(entry, Reply("r0", result={"score": 1.0}))  # late answers after all ...
        await survivor.answer(moved.entries[0], Reply("r0", result={"score": 1.0}))  # ... and so does the survivor
        assert (await p.wait_reply("r0", 2)).result == {"score": 1.0}  # the API takes one
        assert await p.depth() == 0 and (await r.xpending(keys.stream, keys.group))["pending"] == 0
        await r.aclose()

    asyncio.run(main())


@pytest.mark.redis
def test_reply_waits_in_its_list_until_collected(redis_url: str) -> None:  # noqa: F811
    async def main() -> None:
        r, settings, keys = await _seeded(redis_url)
        p, c = Producer(r, settings), Consumer(r, settings, "w")
        await p.enqueue(_job("late"))
        (entry,) = await c.read_batch(1, 0, 100)
        await c.answer(entry, Reply("late", error={"code": "x", "message": "m", "status": 500}))
        assert 0 < await r.ttl(keys.reply("late")) <= settings.request_timeout_s + 60
        await asyncio.sleep(0.1)  # the API only starts waiting now: the reply is still there
        reply = await p.wait_reply("late", 1)
        assert reply is not None and reply.error["code"] == "x"
        await r.aclose()

    asyncio.run(main())


@pytest.mark.redis
def test_workers_heartbeat(redis_url: str) -> None:  # noqa: F811
    async def main() -> None:
        r, settings, _ = await _seeded(redis_url)
        p = Producer(r, settings)
        assert await p.workers_alive() == 0
        await Consumer(r, settings, "w1").heartbeat()
        await Consumer(r, settings, "w2").heartbeat()
        assert await p.workers_alive() == 2
        await Consumer(r, settings, "w1").leave()
        assert await p.workers_alive() == 1
        await r.aclose()

    asyncio.run(main())


@pytest.mark.redis
def test_workers_report_the_categories_version_they_applied(redis_url: str) -> None:  # noqa: F811
    async def main() -> None:
        r, settings, keys = await _seeded(redis_url)
        p = Producer(r, settings)
        assert await p.workers_applied(1) == (0, 0)
        w1, w2 = Consumer(r, settings, "w1"), Consumer(r, settings, "w2")
        for w in (w1, w2):
            await w.heartbeat()
        await w1.report_applied(3)
        await w2.report_applied(2)
        assert await p.workers_applied(3) == (1, 2)
        assert await p.workers_applied(2) == (2, 2)
        await w1.leave()
        assert await r.hget(keys.workers_applied, "w1") is None
        seconds, micros = await r.time()  # a crashed worker: silent for six windows, never left
        now = int(seconds) * 1000 + int(micros) // 1000
        await r.zadd(keys.workers, {"crashed": now - 6 * settings.heartbeat_ttl_ms - 1000})
        await r.hset(keys.workers_applied, "crashed", 3)
        assert await p.workers_alive() == 1
        assert await r.hget(keys.workers_applied, "crashed") is None  # forgotten, not kept forever
        await r.aclose()

    asyncio.run(main())


# --- stores ---------------------------------------------------------------------------------------------------

CATS = [Category(name="a", noun="a", descriptions=("x",)), Category(name="b", noun="b", descriptions=("y",))]


async def _exercise_store(store) -> None:
    v1 = await store.seed(CATS)
    assert set(await store.all()) == {"a", "b"}
    assert await store.seed(CATS) == v1  # idempotent
    await store.delete("a")
    assert await store.seed(CATS) > v1 and set(await store.all()) == {"b"}  # deleted stays deleted
    await store.put(Category(name="a", noun="thing", descriptions=("z",)))
    assert (await store.all())["a"].noun == "thing"
    v = await store.version()
    await store.seed(CATS)
    assert (await store.all())["a"].noun == "thing" and await store.version() == v  # seeding never overwrites


def test_file_category_store(tmp_path: Path) -> None:
    asyncio.run(_exercise_store(FileCategoryStore(tmp_path / "state" / "categories.json")))


@pytest.mark.redis
def test_redis_category_store(redis_url: str) -> None:  # noqa: F811
    async def main() -> None:
        r = Redis.from_url(redis_url)
        await _exercise_store(RedisCategoryStore(r, Keys("s", "g")))
        await r.aclose()

    asyncio.run(main())


@pytest.mark.redis
def test_cache_stores(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    state = {"k1": b"\x00\x01" * 10, "k:2": b""}
    assert unpack_cache_state(pack_cache_state(state)) == state

    async def main() -> None:
        r = Redis.from_url(redis_url)
        for store in (DiskCacheStore(tmp_path / "c"), RedisCacheStore(r, Keys("s", "g"))):
            assert await store.load("m") is None
            await store.save("m", b"blob")
            assert await store.load("m") == b"blob"
        await r.aclose()

    asyncio.run(main())


# --- metrics ---------------------------------------------------------------------------------------------------


def test_metrics_registry_is_per_instance() -> None:
    m1, m2 = Metrics(), Metrics()
    m1.observe_batch(3, 0.2, [0.01, 0.02, 0.03])
    m1.error("queue_full")
    text1, text2 = m1.render()[0].decode(), m2.render()[0].decode()
    assert "filo_batch_size_count 1.0" in text1 and "filo_batch_size_count 0.0" in text2
    assert 'filo_errors_total{reason="queue_full"} 1.0' in text1
    for name in ("filo_queue_wait_seconds", "filo_model_seconds", "filo_queue_depth", "filo_inflight_requests",
                 "filo_workers", "filo_gpu_memory_bytes"):
        assert name in text1
