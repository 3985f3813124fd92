"""The records' upkeep, against real servers: the record writers' consumer group forgets API processes that are
gone (real Redis, the API over loopback), a purge that failed is tried again soon (SQLite), and the review
history reads in the order it happened, by the database's clock (SQLite and PostgreSQL)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import redis

from service.records.db import migrate, open_engine
from service.records.model import InspectionRecord, RecordQuery, Review, now_ms
from service.records.store import RecordStore
from tests.service_fixtures import redis_server, redis_url, wait_until  # noqa: F401
from tests.test_worker_redis import api_servers

STREAM, GROUP = "filo:records", "filo-recorders"


def _record(i: int, created_ms: int | None = None) -> InspectionRecord:
    return InspectionRecord(f"u{i:04d}", created_ms if created_ms is not None else now_ms(), "bottle", 0.2, False,
                            False, 0.5, "default", 0, None, [], [], "m", {}, "line-1")


@pytest.mark.redis
def test_the_records_group_forgets_writers_that_are_gone(redis_url: str, tmp_path: Path) -> None:  # noqa: F811
    """Each API process has a writer in the records group. One that stops cleanly leaves it; one that died is
    removed by a live one once it holds nothing (what it held is taken over and written first), as the request
    group's dead workers are: the group does not grow by one consumer per restart."""
    client = redis.Redis.from_url(redis_url)
    url = f"sqlite:///{tmp_path / 'records.db'}"

    def writers() -> list[str]:
        return sorted(c["name"].decode() for c in client.xinfo_consumers(STREAM, GROUP))

    kw = {"records_url": url, "records_claim_idle_ms": 300}
    for _ in range(3):  # API processes that start and stop
        with api_servers(redis_url, **kw):
            wait_until(lambda: len(writers()) == 1, 15, what="the API's records writer")
    assert writers() == []  # each left on its clean stop

    # two that died: one holding records it had read but not yet written, one holding nothing
    for i in range(3):
        client.xadd(STREAM, _record(i).to_wire())  # type: ignore[arg-type]
    assert len(client.xreadgroup(GROUP, "dead-holding", {STREAM: ">"})[0][1]) == 3
    client.xgroup_createconsumer(STREAM, GROUP, "dead-idle")
    assert writers() == ["dead-holding", "dead-idle"]
    with api_servers(redis_url, **kw):
        store = RecordStore(open_engine(url))
        wait_until(lambda: store.count() == 3, 15, what="the dead writer's records taken over and written")
        wait_until(lambda: len(writers()) == 1 and not writers()[0].startswith("dead-"), 15,
                   what="the dead writers removed")
        assert client.xlen(STREAM) == 0
        store.engine.dispose()
    assert writers() == []


def test_a_purge_that_failed_is_tried_again_soon(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The database refuses the purge (a trigger on SQLite: a real refusal, as a lock or an outage is): it is
    tried again after a short, growing pause, not a whole purge interval (an hour here), and the log says the
    retention as people read it (half a day: 12 hours, not "0 days")."""
    import asyncio
    import logging

    from sqlalchemy import text

    from service.core.telemetry import Metrics
    from service.records.recorder import Records, retention_text
    from tests.service_fixtures import demo_settings

    url = f"sqlite:///{tmp_path / 'records.db'}"
    hour = 3_600_000
    engine = open_engine(url)
    migrate(engine)
    RecordStore(engine).insert_many([_record(1, now_ms() - 13 * hour), _record(2, now_ms() - 11 * hour)])
    with engine.begin() as conn:
        conn.execute(text("CREATE TRIGGER held BEFORE DELETE ON inspections BEGIN "
                          "SELECT RAISE(ABORT, 'held for an audit'); END"))
    settings = demo_settings(records_retention_days=0.5, records_purge_interval_s=3600.0)

    def failed() -> bool:
        return any("records purge failed" in r.getMessage() for r in caplog.records)

    async def scenario() -> list[str]:
        records = Records(settings, Metrics(), url)
        await records.start()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, lambda: wait_until(failed, 15, what="a failed purge"))
            with engine.begin() as conn:  # the refusal ends
                conn.execute(text("DROP TRIGGER held"))
            await loop.run_in_executor(None, lambda: wait_until(lambda: records.store.count() == 1, 15,
                                                                what="the purge tried again"))
            return [r.id for r in records.store.list(RecordQuery(), 10)[0]]
        finally:
            await records.stop()

    with caplog.at_level(logging.INFO, logger="service.records.recorder"):
        left = asyncio.run(scenario())
    engine.dispose()
    assert left == ["u0002"]  # past the retention gone, an hour younger kept
    assert any(r.getMessage() == "purged 1 records older than 12 hours" for r in caplog.records), caplog.text
    assert [retention_text(d) for d in (90, 1, 1.5, 0.5, 1 / 24, 0.01)] == [
        "90 days", "1 day", "1.5 days", "12 hours", "1 hour", "14.4 minutes"]




def _history(store: RecordStore, record_id: str) -> list[int]:
    times = [r.reviewed_ms for r in store.reviews(record_id)]
    current = store.get(record_id)
    assert current is not None and current.review is not None
    assert current.review.reviewed_ms == times[-1]  # the current judgement is the history's last
    return times


def test_review_times_are_the_databases_and_never_go_backwards(store: RecordStore) -> None:
    """Two API processes whose clocks disagree (one an hour ahead, one an hour behind) judge one record in turn:
    the history is stamped by the database, in the order the judgements were written, never backwards."""
    store.insert_many([_record(1)])
    hour = 3_600_000
    ahead, behind = now_ms() + hour, now_ms() - hour
    store.review("u0001", Review("good", None, "a reflection", "anna", ahead))
    store.review("u0001", Review("defect", "scratch", None, "ben", behind))
    times = _history(store, "u0001")
    assert [r.reviewer for r in store.reviews("u0001")] == ["anna", "ben"]
    assert times[0] < times[1] and not {ahead, behind} & set(times)


def test_concurrent_reviews_keep_their_order(store: RecordStore) -> None:
    """Reviewers judge one record at once (threads, each its own transaction): the history's times rise
    strictly in the order the judgements were written, and the current judgement is the last one."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    store.insert_many([_record(2)])
    rng = random.Random(0)
    skews = [rng.randint(-60_000, 60_000) for _ in range(24)]  # what each caller's clock says, off by up to 1 min

    def judge(i: int) -> None:
        store.review("u0002", Review("good" if i % 2 else "defect", None, f"n{i}", f"r{i}", now_ms() + skews[i]))

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(judge, range(24)))
    times = _history(store, "u0002")
    assert len(times) == 24 and all(a < b for a, b in pairwise(times)), times
