"""Queue mode keeps every record through a database outage: real Redis, a real worker, real PostgreSQL.

PostgreSQL is stopped while inspections run and started again; every inspection is still answered, and
once the database is back every record arrives exactly once (the Redis stream holds them meanwhile).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from service.records.db import open_engine
from service.records.model import InspectionRecord, now_ms
from service.records.store import RecordStore
from tests.postgres_server import PostgresServer, postgres  # noqa: F401
from tests.service_fixtures import (  # noqa: F401
    WorkerPool,
    png_bytes,
    redis_server,
    redis_url,
    wait_ready,
    wait_until,
    worker_pool,
)
from tests.test_worker_redis import _metric, api_servers

pytestmark = [pytest.mark.redis, pytest.mark.slow]
N_REQUESTS = 24


def _inspect(base: str, i: int) -> httpx.Response:
    return httpx.post(f"{base}/v1/inspect", data={"category": "bottle", "source": f"line-{i % 3}"},
                      files={"image": ("x.png", png_bytes(60, 80, seed=i), "image/png")}, timeout=120)


def test_records_survive_a_database_outage_none_lost_none_duplicated(
        redis_url: str, worker_pool: WorkerPool, postgres: PostgresServer) -> None:  # noqa: F811
    worker_pool.wait_ready(worker_pool.start(redis_url))
    store = RecordStore(open_engine(postgres.url))
    with api_servers(redis_url, records_url=postgres.url, records_keep="ng") as (api,):
        wait_ready(api.url)
        wait_until(lambda: httpx.get(f"{api.url}/v1/inspections").status_code == 200, 30, what="records ready")
        answered: list[str] = []
        stopped = threading.Event()

        def fire(i: int) -> None:
            if i == N_REQUESTS // 3:
                postgres.stop()  # the database goes away under load
                stopped.set()
            r = _inspect(api.url, i)
            assert r.status_code == 200, r.text
            answered.append(r.json()["request_id"])

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(fire, range(N_REQUESTS)))
        assert stopped.is_set() and len(answered) == N_REQUESTS
        # while it is away: reads say so, and the records wait in Redis
        r = httpx.get(f"{api.url}/v1/inspections")
        assert r.status_code == 503 and r.json()["error"]["code"] == "records_unavailable"
        pending = redis.Redis.from_url(redis_url).xlen("filo:records")
        assert pending > 0
        assert _metric(httpx.get(f"{api.url}/metrics").text, "filo_records_pending") >= pending
        postgres.start()
        wait_until(lambda: store.count() == N_REQUESTS, 60, interval=0.5, what="every record written")
        time.sleep(2)  # anything written twice would show now
        with store.engine.connect() as conn:
            from sqlalchemy import text

            ids = [row[0] for row in conn.execute(text("SELECT id FROM inspections"))]
        assert sorted(ids) == sorted(answered)  # none lost, none duplicated
        assert redis.Redis.from_url(redis_url).xlen("filo:records") == 0
        page = httpx.get(f"{api.url}/v1/inspections?source=line-1&limit=500").json()
        assert len(page["items"]) == N_REQUESTS // 3
        metrics = httpx.get(f"{api.url}/metrics").text
        assert _metric(metrics, "filo_records_written_total") == N_REQUESTS
        assert _metric(metrics, 'filo_records_failed_total{reason="retried"}') > 0
    store.engine.dispose()


def test_a_record_delivered_again_is_written_once(redis_url: str, postgres: PostgresServer) -> None:  # noqa: F811
    """A writer that died between its insert and its acknowledgement: the entry comes again, the row does not."""
    import asyncio

    from redis.asyncio import Redis as AsyncRedis

    from service.core.telemetry import Metrics
    from service.queue.records_stream import RecordAppender, RecordConsumer
    from service.records.recorder import Records
    from tests.service_fixtures import demo_settings

    settings = demo_settings(redis_url=redis_url, records_url=postgres.url)
    record = InspectionRecord("dup-1", now_ms(), "bottle", 0.7, True, False, 0.5, "default", 0, None, [], [], "m",
                              {}, "line-1")

    async def scenario() -> int:
        client = AsyncRedis.from_url(redis_url)
        records = Records(settings, Metrics(), postgres.url)
        await records.start()
        wait_task = asyncio.get_running_loop().run_in_executor(None, wait_until, lambda: records.ready, 30)
        await wait_task
        consumer = RecordConsumer(client, records, settings, records.metrics, "writer-a")
        await consumer.ensure_group()
        await RecordAppender(client, settings, records.metrics)([record])
        await records.write([record])  # the row is in, the stream entry is not yet acknowledged
        settled = await consumer.drain_once()
        await records.stop()
        await client.aclose()
        return settled

    assert asyncio.run(scenario()) == 1
    store = RecordStore(open_engine(postgres.url))
    assert store.count() == 1
    store.engine.dispose()


def test_review_and_learn_in_queue_mode(redis_url: str, worker_pool: WorkerPool,  # noqa: F811
                                        postgres: PostgresServer) -> None:  # noqa: F811
    """The review loop through workers: records in PostgreSQL, judgements, stats, learn (references grow)."""
    from tests.test_records import ADMIN, API, READER, REVIEWER, learn_loop

    worker_pool.wait_ready(worker_pool.start(redis_url))
    with api_servers(redis_url, records_url=postgres.url, records_keep="all", api_keys=[API],
                     reviewer_keys=[f"anna:{REVIEWER}"], reader_keys=[f"qa:{READER}"], admin_key=ADMIN) as (api,):
        wait_ready(api.url)
        with httpx.Client(base_url=api.url, timeout=120) as client:
            wait_until(lambda: client.get("/v1/inspections", headers={"Authorization": f"Bearer {READER}"})
                       .status_code == 200, 30, what="records ready")
            learn_loop(client)


def test_a_long_database_outage_cannot_fill_redis(redis_url: str) -> None:  # noqa: F811
    """Past records_stream_max waiting records the artefacts stay behind; past 4x nothing more is appended."""
    import asyncio

    from redis.asyncio import Redis as AsyncRedis

    from service.core.telemetry import Metrics
    from service.queue.records_stream import RecordAppender, StreamFull
    from service.records.model import Artefact
    from tests.service_fixtures import demo_settings

    settings = demo_settings(redis_url=redis_url, records_stream_max=100)

    def rec(i: int) -> InspectionRecord:
        return InspectionRecord(f"cap-{i}", now_ms(), "bottle", 0.7, True, False, 0.5, "default", 0, None, [], [],
                                "m", {}, None, [Artefact("image", "image/png", b"x" * 1000)])

    async def scenario() -> tuple[int, int, float, bool]:
        client = AsyncRedis.from_url(redis_url)
        metrics = Metrics()
        append = RecordAppender(client, settings, metrics)
        await append([rec(i) for i in range(100)])
        full_before = await client.xlen(settings.records_stream)
        await append([rec(i) for i in range(100, 400)])  # over the soft limit: no artefacts
        last = (await client.xrevrange(settings.records_stream, count=1))[0][1]
        refused = False
        try:
            await append([rec(400)])
        except StreamFull:
            refused = True
        length = await client.xlen(settings.records_stream)
        await client.aclose()
        return full_before, length, metrics.records_failed.labels(reason="artefacts_dropped")._value.get(), \
            refused and b"image" not in last

    before, length, dropped, refused = asyncio.run(scenario())
    assert (before, length, dropped, refused) == (100, 400, 300, True)
