"""The category catalog survives Redis: persisted in its append-only file, re-published by workers when
Redis comes back empty (FLUSHALL), backed up and restored with `filo catalog export/import`.

Every Redis here is a real redis-server; the end-to-end test runs a real `filo worker` subprocess and a
real API server in queue mode.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis as AsyncRedis

from descriptions import Category, CategoryCatalog
from service.api.app import create_app
from service.backends.redis_queue import RedisBackend
from service.catalog.store import CatalogNotPublishedError, CatalogSnapshot, RedisCategoryStore
from service.cli import main
from service.core.keys import Keys
from tests.conftest import needs
from tests.service_fixtures import (  # noqa: F401
    RedisServer,
    ServerThread,
    WorkerPool,
    demo_settings,
    own_redis,
    png_bytes,
    start_persistent_redis,
    wait_ready,
    wait_until,
    worker_pool,
)

pytestmark = pytest.mark.redis

KEYS = Keys("filo:requests", "filo-workers")
GASKET = Category(name="gasket", noun="rubber gasket", descriptions=("torn lip", "air bubble"))
BUNDLED = [CategoryCatalog.load().get(n) for n in ("bottle", "cable")]


def _run(coro_fn, url: str):
    async def go():
        client = AsyncRedis.from_url(url)
        try:
            return await coro_fn(RedisCategoryStore(client, KEYS))
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_custom_category_survives_a_restart_from_the_aof(tmp_path: Path) -> None:
    server = start_persistent_redis(tmp_path)
    try:
        async def register(store: RedisCategoryStore) -> int:
            await store.seed(BUNDLED)
            await store.delete("cable")
            return await store.put(GASKET)

        version = _run(register, server.url)
        server.stop()  # SIGTERM: the AOF is fsynced on every write ("always") and on shutdown
        server = start_persistent_redis(tmp_path, port=server.port)
        snap: CatalogSnapshot = _run(lambda store: store.snapshot(), server.url)
        assert snap.version == version and snap.categories["gasket"] == GASKET
        assert set(snap.categories) == {"bottle", "gasket"} and snap.deleted == {"cable"}
    finally:
        server.stop()


def test_writes_are_refused_until_a_catalog_is_published_and_restore_publishes_once(own_redis: RedisServer) -> None:  # noqa: F811
    async def scenario(store: RedisCategoryStore) -> None:
        with pytest.raises(CatalogNotPublishedError):  # an empty Redis: a PUT must not create a catalog of one
            await store.put(GASKET)
        assert await store.version() == 0 and await store.all() == {}
        snap = CatalogSnapshot(7, {c.name: c for c in [*BUNDLED, GASKET]}, {"carpet"})
        assert await store.restore(snap) == 8  # published, past the version it was taken at
        assert await store.restore(CatalogSnapshot(3, {"bottle": BUNDLED[0]})) == 0  # the first one wins
        again = await store.snapshot()
        assert (again.version, set(again.categories), again.deleted) == (8, {"bottle", "cable", "gasket"}, {"carpet"})
        assert await store.put(GASKET) == 9 and await store.delete("gasket") is True

    _run(scenario, own_redis.url)


def test_catalog_export_and_import_round_trip(own_redis: RedisServer, tmp_path: Path, capsys) -> None:  # noqa: F811
    bundled = [CategoryCatalog.load().get(n) for n in CategoryCatalog.load().names()]

    async def publish(store: RedisCategoryStore) -> None:
        await store.seed(bundled)
        await store.put(GASKET)
        await store.put(Category(name="bottle", noun="glass bottle", descriptions=("chipped rim",)))  # changed
        await store.delete("cable")

    _run(publish, own_redis.url)
    backup = tmp_path / "catalog.json"
    assert main(["catalog", "export", str(backup), "--redis-url", own_redis.url]) == 0
    doc = json.loads(backup.read_text())
    assert doc["format"] == "filo-descriptions/v1" and doc["deleted"] == ["cable"]
    assert [c["name"] for c in doc["categories"]] == ["bottle", "gasket"]  # only what differs from the bundle

    own_redis.client().flushall()
    assert main(["catalog", "import", str(backup), "--redis-url", own_redis.url]) == 2
    assert "start a `filo worker` first" in capsys.readouterr().err
    _run(lambda store: store.seed(bundled), own_redis.url)  # what a starting worker does
    assert main(["catalog", "import", str(backup), "--redis-url", own_redis.url]) == 0
    restored = _run(lambda store: store.all(), own_redis.url)
    assert restored["gasket"] == GASKET and restored["bottle"].noun == "glass bottle" and "cable" not in restored
    assert len(restored) == len(bundled)  # cable out, gasket in
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "filo-descriptions/v1", "categories": [{"name": "x"}]}))
    assert main(["catalog", "import", str(bad), "--redis-url", own_redis.url]) == 2
    assert "invalid category" in capsys.readouterr().err


def _inspect(base: str, category: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{base}/v1/inspect", data={"category": category, "heatmap": "none"},
                      files={"image": ("x.png", png_bytes(60, 80), "image/png")}, timeout=timeout)


def _metric(text: str, name: str) -> float:
    """A sample's value; 0 when the labelled sample was never set."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _register_gasket(api: str) -> None:
    """The custom category with two references and a threshold set by hand."""
    put = httpx.put(f"{api}/v1/categories/gasket", json={"noun": GASKET.noun, "descriptions": list(GASKET.descriptions)},
                    timeout=30)
    assert put.status_code == 200, put.text
    refs = [("images", (f"r{i}.png", png_bytes(64, 64, seed=40 + i), "image/png")) for i in range(2)]
    assert httpx.put(f"{api}/v1/categories/gasket/references", files=refs, timeout=60).status_code == 200
    r = httpx.put(f"{api}/v1/categories/gasket/threshold", json={"threshold": 0.42}, timeout=30)
    assert r.status_code == 200, r.text


def _served_as_before(api: str) -> bool:
    r = _inspect(api, "gasket", timeout=10)
    if r.status_code != 200:
        return False
    body = r.json()
    return (body["references"], body["threshold"], body["threshold_source"]) == (2, 0.42, "manual")


def test_the_race_a_new_worker_on_an_emptied_redis_while_old_ones_pause(own_redis: RedisServer,  # noqa: F811
                                                                        worker_pool: WorkerPool) -> None:  # noqa: F811
    """Redis emptied while an old worker is paused, and a new worker publishes the bundled categories alone
    as version 1; no records database: the paused worker, resumed, re-publishes its snapshot, loudly."""
    old = worker_pool.start(own_redis.url)
    worker_pool.wait_ready(old)
    settings = demo_settings(redis_url=own_redis.url, records=False)
    with ServerThread(create_app(settings, RedisBackend(settings))) as api:
        wait_ready(api.url, 30)
        _register_gasket(api.url)
        assert _served_as_before(api.url)
        version = int(own_redis.client().get(KEYS.categories_version))
        old.proc.send_signal(signal.SIGSTOP)
        try:
            own_redis.client().flushall()
            new = worker_pool.start(own_redis.url)
            worker_pool.wait_ready(new)
            assert int(own_redis.client().get(KEYS.categories_version)) < version  # the bundled ones, anew
            assert not own_redis.client().hexists(KEYS.categories, "gasket")
        finally:
            old.proc.send_signal(signal.SIGCONT)
        t0 = time.monotonic()
        wait_until(lambda: _served_as_before(api.url), 15, interval=0.5, what="gasket served again")
        print(f"gasket served again {time.monotonic() - t0:.2f} s after the old worker resumed")
        assert "CATALOG VERSION WENT BACKWARDS" in old.log()
        assert _metric(httpx.get(f"{old.url}/metrics", timeout=10).text,
                       "filo_catalog_version_regressions_total") == 1


def test_the_database_brings_back_a_catalog_no_worker_remembers(own_redis: RedisServer,  # noqa: F811
                                                                worker_pool: WorkerPool) -> None:  # noqa: F811
    """Redis emptied while every worker rolled: only the records database still holds the custom category."""
    from tests.postgres_server import postgres_bin, start_postgres

    needs(postgres_bin() is not None, "PostgreSQL binaries (Debian's postgresql)")
    pg = start_postgres()
    try:
        old = worker_pool.start(own_redis.url)
        worker_pool.wait_ready(old)
        settings = demo_settings(redis_url=own_redis.url, records_url=pg.url, catalog_sync_s=0.5)
        with ServerThread(create_app(settings, RedisBackend(settings))) as api:
            wait_ready(api.url, 30)
            _register_gasket(api.url)
        old.proc.kill()  # every worker rolls ...
        old.proc.wait(10)
        own_redis.client().flushall()  # ... and Redis restarts without its volume
        new = worker_pool.start(own_redis.url)
        worker_pool.wait_ready(new)  # it published the bundled categories alone
        assert not own_redis.client().hexists(KEYS.categories, "gasket")
        with ServerThread(create_app(settings, RedisBackend(settings))) as api:
            t0 = time.monotonic()
            wait_until(lambda: _served_as_before(api.url), 15, interval=0.5, what="gasket served again")
            print(f"gasket served again {time.monotonic() - t0:.2f} s after the API pod started")
            metrics = httpx.get(f"{api.url}/metrics").text
            assert _metric(metrics, "filo_catalog_version_regressions_total") == 1
            assert _metric(metrics, 'filo_catalog_restores_total{source="database"}') == 1
    finally:
        pg.destroy()


def test_flushall_heals_and_aof_restart_keeps_the_custom_category(tmp_path: Path, worker_pool: WorkerPool) -> None:  # noqa: F811
    server = start_persistent_redis(tmp_path / "")
    try:
        worker = worker_pool.start(server.url)
        worker_pool.wait_ready(worker)
        settings = demo_settings(redis_url=server.url, request_timeout_s=8.0)
        with ServerThread(create_app(settings, RedisBackend(settings))) as api:
            wait_ready(api.url, 30)
            put = httpx.put(f"{api.url}/v1/categories/gasket", json={"noun": GASKET.noun,
                                                                       "descriptions": list(GASKET.descriptions)},
                            timeout=30)
            assert put.status_code == 200 and put.json()["workers_ready"] == 1, put.text
            assert _inspect(api.url, "gasket").status_code == 200

            # FLUSHALL: everything is gone (catalog, caches, stream, group, heartbeats) ...
            late: dict[str, object] = {}

            def during() -> None:  # a request sent into the gap is answered by its deadline, whatever it says
                t0 = time.monotonic()
                late["response"] = _inspect(api.url, "gasket", timeout=30)
                late["seconds"] = time.monotonic() - t0

            server.client().flushall()
            t_flush = time.monotonic()
            gap = threading.Thread(target=during)
            gap.start()
            # ... and the service heals by itself: ready again, the custom category back, within 15 s
            wait_ready(api.url, 15)
            healed_s = time.monotonic() - t_flush
            print(f"ready again {healed_s:.2f} s after FLUSHALL")
            assert healed_s < 15
            r = server.client()
            assert json.loads(r.hget(KEYS.categories, "gasket")) == GASKET.model_dump(mode="json")
            assert r.hexists(KEYS.categories, "bottle")  # the bundled ones too
            wait_until(lambda: bool(r.keys("filo:requests:cache:*")), 10, what="prompt caches re-saved")
            ok = _inspect(api.url, "gasket")
            assert ok.status_code == 200, ok.text
            gap.join(30)
            assert late["seconds"] <= settings.request_timeout_s + 2  # nobody waited past the deadline
            assert late["response"].status_code in (200, 503, 504), late["response"].text
            detail = httpx.get(f"{worker.url}/readyz", timeout=10).json()["detail"]
            from_db = _metric(httpx.get(f"{api.url}/metrics").text, 'filo_catalog_restores_total{source="database"}')
            assert detail["catalog_republished"] + from_db == 1  # the worker's snapshot or the database: once

            # a restart from the append-only file: the custom category is still there, no re-publish needed
            server.stop()
            server = start_persistent_redis(tmp_path, port=server.port)
            assert server.client().hexists(KEYS.categories, "gasket")
            wait_ready(api.url, 30)
            after = _inspect(api.url, "gasket")
            assert after.status_code == 200, (after.text, worker.log()[-3000:])
            assert httpx.get(f"{worker.url}/readyz", timeout=10).json()["detail"]["catalog_republished"] \
                == detail["catalog_republished"]
    finally:
        server.stop()
