"""The records writer under faults, against real databases: a full disk (SQLite) that frees up again."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from sqlalchemy import event

from service.api.app import create_app
from service.backends.embedded import EmbeddedBackend
from tests.service_fixtures import ServerThread, demo_settings, png_bytes, wait_until

SQLITE_MAX_PAGES = 1073741823  # SQLite's own default cap: no limit short of the disk


def metric(text: str, name: str) -> float:
    """A sample's value, 0 when the series does not exist (yet)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_full_disk_that_frees_up_recovers_by_itself(tmp_path: Path) -> None:
    """SQLite's own limit (PRAGMA max_page_count, set on every connection the pool hands out) makes writes fail
    with SQLITE_FULL, as a full disk does, and lifting it is the space coming back. While full: inspections are
    answered, /readyz says records are degraded and why, the failures are counted by cause and `retried` counts
    each record once. With a little room: the batch is retried in halves, so what fits is written (one batch
    of all of them never fits). With room again: everything is written, once, and the state is ok."""
    settings = demo_settings(state_dir=tmp_path, records_keep="all", records_batch=16)
    backend = EmbeddedBackend(settings)
    assert backend.records is not None
    engine = backend.records.store.engine
    cap = {"pages": SQLITE_MAX_PAGES}

    @event.listens_for(engine, "checkout")
    def limit(dbapi_conn, _record, _proxy) -> None:  # type: ignore[no-untyped-def]
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA max_page_count={cap['pages']}")  # never below the file's size: SQLite keeps that
        cur.close()

    def pages() -> int:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql("PRAGMA page_count").scalar_one())

    with ServerThread(create_app(settings, backend)) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, 120, what="embedded server ready")
        first = client.post("/v1/inspect", data={"category": "bottle"}, files={"image": ("a.png", png_bytes(40, 40))})
        wait_until(lambda: backend.records.store.count() == 1, 10, what="the first record")
        assert client.get("/readyz").json()["detail"]["records"] == {"state": "ok", "pending": 0}

        cap["pages"] = 1  # the disk is full: not one more page
        ids = [client.post("/v1/inspect", data={"category": "bottle"},
                           files={"image": ("x.png", png_bytes(180, 180, seed=i))}).json()["request_id"]
               for i in range(8)]  # each keeps ~100 KB of incompressible image: ~25 pages
        wait_until(lambda: metric(client.get("/metrics").text,
                                  'filo_records_write_failures_total{cause="disk_full"}') >= 5, 30,
                   what="five failed writes")
        records = client.get("/readyz").json()
        assert records["ready"] and records["detail"]["records"] == {"state": "degraded", "cause": "disk_full",
                                                                     "pending": 8}
        text = client.get("/metrics").text
        attempts = metric(text, 'filo_records_write_failures_total{cause="disk_full"}')
        retried = metric(text, 'filo_records_failed_total{reason="retried"}')
        assert 1 <= retried <= 8 < 8 * attempts  # each record once, however often it was tried
        assert backend.records.store.count() == 1

        cap["pages"] = pages() + 60  # some room back: a record or two fits, the eight together do not
        wait_until(lambda: backend.records.store.count() > 1, 30, what="what fits written in smaller batches")
        assert backend.records.store.count() < 9

        cap["pages"] = SQLITE_MAX_PAGES  # the space is back
        wait_until(lambda: backend.records.store.count() == 9, 30, what="every record written")
        wait_until(lambda: client.get("/readyz").json()["detail"]["records"] == {"state": "ok", "pending": 0}, 10,
                   what="records ok again")
        listed = client.get("/v1/inspections?limit=500").json()["items"]
        assert sorted(r["id"] for r in listed) == sorted([first.json()["request_id"], *ids])
        text = client.get("/metrics").text
        assert metric(text, 'filo_records_failed_total{reason="retried"}') <= 8  # records, not attempts
        assert metric(text, 'filo_records_write_failures_total{cause="disk_full"}') > attempts
        assert metric(text, "filo_records_written_total") == 9
