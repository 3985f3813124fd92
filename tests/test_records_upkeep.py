"""The records' upkeep, against real servers: the record writers' consumer group forgets API processes that are
gone (real Redis, the API over loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from service.records.db import open_engine
from service.records.model import InspectionRecord, now_ms
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
