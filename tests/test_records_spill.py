"""Answered inspections whose records wait in the API process's buffer outlive a graceful stop: real `filo serve`
processes, a real PostgreSQL that is away, real Redis and a real worker.

Queue mode: with the records stream at its cap the records wait in the buffer; SIGTERM hands them to the stream
past the cap, and once the database is back a new API process writes every one, once. Embedded mode (and queue
mode without Redis): SIGTERM spills them to owner-only files under the state directory, which the next start
replays into the database and removes.
"""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import text

from service.records.db import open_engine
from service.records.model import InspectionRecord, now_ms
from service.records.store import RecordStore
from tests.postgres_server import PostgresServer, postgres  # noqa: F401
from tests.service_fixtures import (  # noqa: F401
    REPO,
    WorkerPool,
    free_port,
    png_bytes,
    redis_server,
    redis_url,
    wait_ready,
    wait_until,
    worker_env,
    worker_pool,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]
STREAM = "filo:records"


@dataclass
class Api:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def inspect(self, i: int) -> str:
        r = httpx.post(f"{self.url}/v1/inspect", data={"category": "bottle", "source": "line-1"},
                       files={"image": ("x.png", png_bytes(40, 50, seed=i), "image/png")}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["request_id"]

    def records(self) -> dict:
        return httpx.get(f"{self.url}/readyz", timeout=10).json()["detail"]["records"]

    def stop(self) -> None:
        """SIGTERM, as an orchestrator stops a pod: a graceful stop (uvicorn ends by re-raising the signal)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"no exit within 60 s of SIGTERM; log:\n{self.log()[-3000:]}") from None
        assert status in (0, -signal.SIGTERM) and "Application shutdown complete" in self.log(), self.log()[-3000:]


@contextmanager
def serving(tmp_path: Path, name: str, *args: str, **env: str) -> Iterator[Api]:
    """`filo serve` in a process of its own; killed at the end if the test did not stop it."""
    port = free_port()
    log_path = tmp_path / f"{name}.log"
    settings = {"FILO_PROFILE": "demo", "FILO_IMAGE_SIZE": "224", "FILO_GROUNDING": "false", "FILO_PORT": str(port),
                "FILO_STATE_DIR": str(tmp_path / "state"), "FILO_RECORDS_KEEP": "ng", **env}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", *args], cwd=REPO,
                                env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT)
    api = Api(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        try:
            wait_ready(api.url, 120)
        except TimeoutError:
            raise AssertionError(f"{name} not ready; log:\n{api.log()[-3000:]}") from None
        yield api
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _ids(url: str) -> list[str]:
    store = RecordStore(open_engine(url))
    try:
        with store.engine.connect() as conn:
            return [row[0] for row in conn.execute(text("SELECT id FROM inspections"))]
    finally:
        store.engine.dispose()


def test_a_graceful_stop_hands_the_buffer_to_the_stream_past_its_cap(
        redis_url: str, worker_pool: WorkerPool, postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    worker_pool.wait_ready(worker_pool.start(redis_url))
    postgres.stop()  # away for long: the stream fills to its cap
    client = redis.Redis.from_url(redis_url)
    waiting = [InspectionRecord(f"pre-{i:03d}", now_ms(), "bottle", 0.2, False, False, 0.5, "default", 0, None, [],
                                [], "m", {}, "line-0") for i in range(400)]
    for record in waiting:
        client.xadd(STREAM, record.to_wire())  # type: ignore[arg-type]
    env = {"FILO_REDIS_URL": redis_url, "FILO_RECORDS_URL": postgres.url, "FILO_RECORDS_STREAM_MAX": "100"}
    with serving(tmp_path, "api-1", **env) as api:
        answered = [api.inspect(i) for i in range(6)]
        wait_until(lambda: api.records() == {"state": "degraded", "cause": "stream_full", "pending": 6}, 20,
                   what="the records waiting in the buffer")
        assert client.xlen(STREAM) == 400
        api.stop()
    assert client.xlen(STREAM) == 406  # handed over past the cap, not lost with the process
    assert not (tmp_path / "state" / "records-spill").exists() or not any((tmp_path / "state" / "records-spill").iterdir())
    postgres.start()
    with serving(tmp_path, "api-2", **env) as api:
        wait_until(lambda: len(_ids(postgres.url)) == 406, 60, interval=0.5, what="every record written")
        wait_until(lambda: client.xlen(STREAM) == 0, 10, what="the stream drained")
        ids = _ids(postgres.url)
        assert sorted(ids) == sorted([r.id for r in waiting] + answered)  # none lost, none twice
        api.stop()


def test_a_graceful_stop_spills_what_it_cannot_write_and_the_next_start_replays_it(
        postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    postgres.stop()
    spill = tmp_path / "state" / "records-spill"
    env = {"FILO_RECORDS_URL": postgres.url}
    with serving(tmp_path, "embedded-1", "--embedded", **env) as api:
        answered = [api.inspect(i) for i in range(5)]
        wait_until(lambda: api.records()["pending"] == 5, 20, what="the records waiting in the buffer")
        assert api.records()["state"] == "degraded"
        api.stop()
    files = sorted(spill.iterdir())
    assert sorted(p.name for p in files) == sorted(f"{rid}.record" for rid in answered)  # one file a record
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600} and stat.S_IMODE(spill.stat().st_mode) == 0o700
    postgres.start()
    with serving(tmp_path, "embedded-2", "--embedded", **env) as api:
        wait_until(lambda: sorted(_ids(postgres.url)) == sorted(answered), 60, interval=0.5, what="the replay")
        wait_until(lambda: not any(spill.iterdir()), 10, what="the spilled files removed")
        more = api.inspect(99)
        wait_until(lambda: more in _ids(postgres.url), 20, what="a new record")
        api.stop()
    assert sorted(_ids(postgres.url)) == sorted([*answered, more])  # none twice
