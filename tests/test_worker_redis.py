"""Queue mode end to end: API processes + `filo worker` subprocesses + a real redis-server.

Each worker is a real `python -m service.cli worker` process running the demo engine, so killing
one with SIGKILL is a real crash. Everything is bounded: requests time out, waits have deadlines,
fixtures stop every process they started.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from redis.asyncio import Redis as AsyncRedis

from descriptions import Category
from filo_lab.bench.failover import kill_while_holding, load_image, rescued, seconds_until_counted
from filo_lab.bench.load_client import LoadReport, run_load
from service.api.app import create_app
from service.backends.redis_queue import RedisBackend
from service.catalog.store import RedisCategoryStore
from service.core.keys import Keys
from service.queue.protocol import Reply
from tests.service_fixtures import (  # noqa: F401
    REPO,
    RedisServer,
    ServerThread,
    WorkerPool,
    WorkerProc,
    demo_settings,
    free_port,
    own_redis,
    png_bytes,
    redis_server,
    redis_url,
    stop_process,
    wait_ready,
    wait_until,
    worker_env,
    worker_pool,
)

pytestmark = pytest.mark.redis

STREAM = "filo:requests"
GROUP = "filo-workers"


@contextmanager
def api_servers(url: str, n: int = 1, **kw: object) -> Iterator[list[ServerThread]]:
    """`n` independent API apps (as separate API processes would be) on one Redis."""
    with ExitStack() as stack:
        servers = []
        for _ in range(n):
            settings = demo_settings(redis_url=url, **kw)
            servers.append(stack.enter_context(ServerThread(create_app(settings, RedisBackend(settings)))))
        yield servers


def inspect(base: str, category: str = "bottle", timeout: float = 120, **fields: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/inspect", data={"category": category, **fields},
                      files={"image": ("x.png", png_bytes(60, 80), "image/png")}, timeout=timeout)


def fire(bases: list[str], n: int, **fields: str) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: inspect(bases[i % len(bases)], **fields), range(n)))


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_two_workers_two_apis_end_to_end(redis_url: str, worker_pool: WorkerPool) -> None:  # noqa: F811
    first = worker_pool.start(redis_url, FILO_MAX_BATCH_SIZE="2")
    assert worker_pool.wait_ready(first)["detail"]["cache_source"] == "built"  # empty Redis
    second = worker_pool.start(redis_url, FILO_MAX_BATCH_SIZE="2")
    detail = worker_pool.wait_ready(second)["detail"]
    assert detail["cache_source"] == "persisted" and detail["cache_entries_loaded"] > 0  # restart reads caches
    with api_servers(redis_url, n=2) as apis:
        bases = [a.url for a in apis]
        ready = wait_ready(bases[0])
        assert ready["mode"] == "queue" and ready["detail"]["workers"] == 2
        responses = fire(bases, 8)
        for r in responses:
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"]["name"] and body["timing_ms"]["model"] > 0
            assert body["heatmap"]["media_type"] == "image/jpeg" and body["heatmap_png"] is None
            assert Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["base64"]))).size == (80, 60)
        assert len({r.json()["request_id"] for r in responses}) == 8
        batches = [httpx.get(f"{w.url}/readyz", timeout=10).json()["detail"]["batches"] for w in (first, second)]
        assert all(b >= 1 for b in batches), batches  # both workers took part
        worker_metrics = httpx.get(f"{first.url}/metrics", timeout=10).text
        assert _metric(worker_metrics, "filo_batch_size_count") >= 1
        api_metrics = httpx.get(f"{bases[0]}/metrics", timeout=10).text
        assert _metric(api_metrics, "filo_workers") == 2
        assert _metric(api_metrics, 'filo_requests_total{route="/v1/inspect",status="200"}') == 4

        # a category registered through one API reaches every worker before its next batch
        r = httpx.put(f"{bases[1]}/v1/categories/hinge", json={"descriptions": ["bent pin", "rust"]}, timeout=30)
        assert r.status_code == 200, r.text
        assert (r.json()["workers_ready"], r.json()["workers_live"]) == (2, 2)  # answered once both had built it
        for r in fire(bases, 4, category="hinge", top_k="2"):
            assert r.status_code == 200, r.text
            assert {t["description"] for t in r.json()["top_types"]} <= {"bent pin", "rust"}
        assert httpx.delete(f"{bases[0]}/v1/categories/hinge", timeout=30).status_code == 204
        r = inspect(bases[1], category="hinge")
        assert r.status_code == 404 and "bottle" in r.json()["error"]["known_categories"]
    assert redis.Redis.from_url(redis_url).xlen(STREAM) == 0  # every entry acknowledged and deleted


def _pending_by_consumer(r: redis.Redis) -> dict[str, int]:
    info = r.xpending(STREAM, GROUP)
    return {c["name"].decode(): int(c["pending"]) for c in info.get("consumers") or []}


def test_worker_killed_mid_batch_loses_nothing(redis_url: str, worker_pool: WorkerPool) -> None:  # noqa: F811
    env = {"FILO_CLAIM_IDLE_MS": "1500", "FILO_MAX_BATCH_SIZE": "4", "FILO_MAX_WAIT_MS": "300"}
    victim = worker_pool.start(redis_url, **env)
    worker_pool.wait_ready(victim)
    r = redis.Redis.from_url(redis_url)
    with api_servers(redis_url, request_timeout_s=120) as (api,), ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(inspect, api.url) for _ in range(6)]
        killed_holding = 0
        deadline = time.monotonic() + 60
        while not killed_holding and time.monotonic() < deadline:
            if sum(_pending_by_consumer(r).values()) > 0:
                os.kill(victim.proc.pid, signal.SIGSTOP)  # freeze it, then check it really holds entries
                held = sum(_pending_by_consumer(r).values())
                if held > 0:
                    os.kill(victim.proc.pid, signal.SIGKILL)
                    victim.proc.wait(10)
                    killed_holding = held
                else:
                    os.kill(victim.proc.pid, signal.SIGCONT)
            time.sleep(0.01)
        assert killed_holding > 0, "never caught the worker holding pending entries"
        rescuer = worker_pool.start(redis_url, **env)
        responses = [f.result(timeout=180) for f in futures]
    assert [x.status_code for x in responses] == [200] * 6, [x.text for x in responses]
    assert "reclaimed" in rescuer.log()
    assert r.xlen(STREAM) == 0 and r.xpending(STREAM, GROUP)["pending"] == 0


# --- failover under load: one of two workers SIGKILLed while clients keep sending -----------------------------
# The timing figures (p50, p99, slowest, how long the dead worker is counted) are the benchmark's
# (filo_lab/bench/failover.py, quoted in docs/service.md); this test checks the mechanism only.
FAILOVER_LOAD = {"concurrency": 8, "duration_s": 10.0, "max_requests": 600}
FAILOVER_HELD = 3  # the victim dies holding at least this many requests


def _load_in_background(url: str) -> tuple[threading.Thread, dict[str, LoadReport]]:
    """`filo loadtest`'s client against `url` in a thread of its own; the report lands in the dict."""
    out: dict[str, LoadReport] = {}
    image = load_image()

    def run() -> None:
        out["report"] = asyncio.run(run_load(url, "bottle", image, timeout_s=30.0, **FAILOVER_LOAD))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_failover_under_load_after_sigkill(redis_url: str, worker_pool: WorkerPool) -> None:  # noqa: F811
    """Two workers under steady load, one SIGKILLed while it holds requests: the survivor takes every one of them
    over by the heartbeat take-over (`filo_worker_rescued_total{how="heartbeat"}`), none by the idle claim
    (`claim_idle_ms` is left at its 15 s default, longer than the load runs after the kill), nothing is lost, and
    the dead worker leaves /readyz and the consumer group."""
    env = {"FILO_MAX_BATCH_SIZE": "4"}
    victim, survivor = worker_pool.start(redis_url, **env), worker_pool.start(redis_url, **env)
    victim_name = worker_pool.wait_ready(victim)["detail"]["worker"]
    worker_pool.wait_ready(survivor)
    r = redis.Redis.from_url(redis_url)
    with api_servers(redis_url, request_timeout_s=30.0) as (api,):
        assert wait_ready(api.url)["detail"]["workers"] == 2
        load, out = _load_in_background(api.url)
        killed_at, held = kill_while_holding(victim.proc.pid, victim_name, r, FAILOVER_HELD)
        victim.proc.wait(10)
        seconds_until_counted(api.url, 1, killed_at)  # bounded wait: the dead worker leaves /readyz
        load.join(FAILOVER_LOAD["duration_s"] + 60)
        assert not load.is_alive(), "the load did not stop by itself"
    summary = out["report"].summary()
    how = rescued(survivor.url)
    assert summary["lost"] == 0 and summary["ok"] == summary["sent"] > 0, summary
    assert how == {"heartbeat": held, "idle_claim": 0}, (how, held)  # taken at once by heartbeat, every one
    assert "heartbeat lapsed" in survivor.log()
    assert victim_name not in _pending_by_consumer(r)
    assert victim_name.encode() not in {c["name"] for c in r.xinfo_consumers(STREAM, GROUP)}
    assert r.xlen(STREAM) == 0 and r.xpending(STREAM, GROUP)["pending"] == 0


def _raw_entry(r: redis.Redis, rid: str, category: str = "bottle", timeout_ms: int = 60_000,
               image: bytes | None = None, **extra: object) -> str:
    keys = Keys(STREAM, GROUP)
    params = {"category": category, "top_k": 3, "grounding": None, "want_map": False, **extra}
    fields = {"id": rid, "reply": keys.reply(rid), "timeout_ms": str(timeout_ms), "params": json.dumps(params),
              "image": png_bytes(40, 40) if image is None else image}
    return r.xadd(STREAM, fields).decode()


def _reply(r: redis.Redis, rid: str, timeout: float = 60) -> Reply:
    got = r.blpop([Keys(STREAM, GROUP).reply(rid)], timeout=timeout)
    assert got is not None, f"no reply for {rid}"
    return Reply.decode(got[1])


def test_worker_fails_poison_and_expired_explicitly_and_isolates_bad_requests(
    redis_url: str, worker_pool: WorkerPool  # noqa: F811
) -> None:
    r = redis.Redis.from_url(redis_url)
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    # a request that (we pretend) crashed four workers: read once, then claimed three more times
    poison_id = _raw_entry(r, "poison")
    r.xreadgroup(GROUP, "crashed-0", {STREAM: ">"}, count=1)
    for i in (1, 2, 3):
        r.xclaim(STREAM, GROUP, f"crashed-{i}", 0, [poison_id])
    assert r.xpending_range(STREAM, GROUP, "-", "+", 1)[0]["times_delivered"] == 4
    _raw_entry(r, "expired", timeout_ms=1)  # its deadline passes before any worker exists
    w = worker_pool.start(redis_url, FILO_CLAIM_IDLE_MS="500", FILO_MAX_WAIT_MS="500", FILO_MAX_BATCH_SIZE="8")
    worker_pool.wait_ready(w)
    expired = _reply(r, "expired")
    assert expired.error["code"] == "deadline_exceeded" and expired.error["status"] == 504
    poison = _reply(r, "poison")
    assert poison.error["code"] == "poison_request" and "not retried" in poison.error["message"]
    # one batch: a good request, one the engine rejects, one that is not an image, one malformed
    _raw_entry(r, "good")
    _raw_entry(r, "with-map", want_map=True, map_encoding="uint8", heatmap={"format": "map", "size": "frame"})
    _raw_entry(r, "bad-category", category="no-such")
    _raw_entry(r, "bad-image", image=b"garbage")
    whole = png_bytes(120, 120)
    _raw_entry(r, "truncated", image=whole[: len(whole) // 2])  # the API checked its header only
    r.xadd(STREAM, {"id": "broken", "reply": Keys(STREAM, GROUP).reply("broken")})
    good = _reply(r, "good")
    assert good.error is None and good.result["score"] >= 0 and good.anomaly_map is None  # want_map False
    assert good.heatmap is None  # none asked for
    with_map = _reply(r, "with-map")
    assert with_map.map_encoding == "uint8" and with_map.anomaly_map.shape == (224, 224)
    levels = with_map.anomaly_map * 255
    assert np.abs(levels - np.rint(levels)).max() < 1e-3  # travelled as 8 bits, back as float32
    # the map PNG the worker rendered holds the same 8-bit values
    assert (with_map.heatmap.kind, with_map.heatmap.width) == ("map", 224)
    png_levels = np.asarray(Image.open(io.BytesIO(with_map.heatmap.data)))
    assert np.array_equal(png_levels, np.rint(levels).astype(np.uint8))
    assert _reply(r, "bad-category").error["status"] == 404
    assert _reply(r, "bad-image").error == {"code": "not_an_image", "status": 415,
                                            "message": "the data is not an image in a supported format"}
    truncated = _reply(r, "truncated").error
    assert (truncated["code"], truncated["status"]) == ("truncated_image", 422)
    assert _reply(r, "broken").error["code"] == "malformed_request"
    wait_until(lambda: r.xlen(STREAM) == 0, 10, what="stream drained")
    metrics = httpx.get(f"{w.url}/metrics", timeout=10).text
    assert _metric(metrics, 'filo_errors_total{reason="poison_request"}') == 1
    assert _metric(metrics, 'filo_errors_total{reason="deadline_exceeded"}') == 1
    assert httpx.get(f"{w.url}/healthz", timeout=10).json() == {"status": "ok"}


def test_api_queue_full_deadline_and_redis_down(own_redis: RedisServer) -> None:  # noqa: F811
    """No worker: 503 at once. A stalled one: requests queue (429 past the limit) and time out (504).
    Redis gone: 503, never a hang."""
    with api_servers(own_redis.url, queue_max_depth=2, request_timeout_s=3.0, category_apply_timeout_s=1.0) as (api,):
        r = own_redis.client()
        not_ready = inspect(api.url)
        assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"

        async def seed() -> None:
            client = AsyncRedis.from_url(own_redis.url)
            await RedisCategoryStore(client, Keys(STREAM, GROUP)).seed(
                [Category(name="bottle", noun="bottle", descriptions=("crack",))])
            await client.aclose()

        asyncio.run(seed())
        # published, but no worker: a request would not be served, so not ready (and it says why)
        wait_until(lambda: httpx.get(f"{api.url}/readyz", timeout=5).json()["detail"]["categories_published"], 10,
                   what="categories published")
        unready = httpx.get(f"{api.url}/readyz", timeout=5)
        assert unready.status_code == 503 and unready.json()["detail"]["workers"] == 0
        t0 = time.monotonic()
        nobody = inspect(api.url)  # no live worker: refused at once rather than queued until the deadline
        assert nobody.status_code == 503 and nobody.json()["error"]["code"] == "no_workers", nobody.text
        assert time.monotonic() - t0 < 2.5 and r.xlen(STREAM) == 0
        assert int(nobody.headers["retry-after"]) == 5
        sec, micros = r.time()  # a live but stalled worker: a fresh heartbeat (for a minute), never reads
        r.zadd(f"{STREAM}:workers", {"stalled": sec * 1000 + micros // 1000 + 60_000})
        t0 = time.monotonic()  # ... and never applies a new category: PUT waits, then says so
        put = httpx.put(f"{api.url}/v1/categories/hinge", json={"descriptions": ["bent pin"]}, timeout=30)
        assert put.status_code == 200 and (put.json()["workers_ready"], put.json()["workers_live"]) == (0, 1)
        assert 0.8 <= time.monotonic() - t0 < 5
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(inspect, api.url) for _ in range(2)]
            wait_until(lambda: r.xlen(STREAM) == 2, 10, what="two queued")
            full = inspect(api.url)
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
            assert int(full.headers["retry-after"]) >= 1
            for f in waiting:
                late = f.result(timeout=30)
                assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
        # the timed-out entries stay queued for a worker to answer explicitly (see the worker test)
        r.delete(STREAM)
        holder: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: holder.update(resp=inspect(api.url)))
        t.start()
        wait_until(lambda: r.xlen(STREAM) == 1, 10, what="request accepted")
        own_redis.stop()  # Redis dies while the request waits for its answer
        t.join(30)
        accepted = holder["resp"]
        assert accepted.status_code == 503 and accepted.json()["error"]["code"] == "redis_unavailable"
        assert "queued" in accepted.json()["error"]["message"]  # said explicitly, not dropped silently
        fresh = inspect(api.url)
        assert fresh.status_code == 503 and fresh.json()["error"]["code"] == "redis_unavailable"
        assert httpx.get(f"{api.url}/readyz", timeout=10).status_code == 503
        assert httpx.get(f"{api.url}/healthz", timeout=10).status_code == 200
        metrics = httpx.get(f"{api.url}/metrics", timeout=10).text
        assert _metric(metrics, 'filo_errors_total{reason="redis_unavailable"}') == 2
        assert _metric(metrics, 'filo_errors_total{reason="queue_full"}') == 1
        assert _metric(metrics, 'filo_errors_total{reason="no_workers"}') == 1


def test_worker_waits_out_a_missing_redis_and_stops_on_sigterm(worker_pool: WorkerPool) -> None:  # noqa: F811
    w = worker_pool.start(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    wait_until(lambda: httpx.get(f"{w.url}/healthz", timeout=5).status_code == 200, 60, what="worker /healthz")
    ready = httpx.get(f"{w.url}/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json()["detail"]["redis"] == "unreachable"
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(20) == 0


HEAVY_MODULES = ("torch", "torchvision", "open_clip", "transformers", "safetensors")
TORCH_FREE_SERVE = (
    "import sys\n"
    f"sys.modules.update(dict.fromkeys({HEAVY_MODULES!r}))  # any import of these now fails\n"
    "from service.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_api_runs_without_torch(redis_url: str, worker_pool: WorkerPool, tmp_path) -> None:  # noqa: F811
    """The slim API image has no torch: queue mode must import, serve and inspect without it."""
    worker = worker_pool.start(redis_url)
    worker_pool.wait_ready(worker)
    port = free_port()
    log_path = tmp_path / "api.log"
    env = worker_env({"FILO_PROFILE": "demo", "FILO_REDIS_URL": redis_url, "FILO_PORT": str(port)})
    with open(log_path, "wb") as log:
        api = subprocess.Popen([sys.executable, "-c", TORCH_FREE_SERVE, "serve"], cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        try:
            ready = wait_ready(base, 60)
        except TimeoutError:
            raise AssertionError(log_path.read_text(errors="replace")[-3000:]) from None
        assert ready["mode"] == "queue" and ready["detail"]["workers"] == 1
        r = inspect(base, top_k="2")
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["top_types"]) == 2 and 0 <= body["score"] <= 1
        assert Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["base64"]))).size == (80, 60)
        png = httpx.post(f"{base}/v1/inspect", data={"category": "bottle"}, headers={"Accept": "image/png"},
                         files={"image": ("x.png", png_bytes(60, 80), "image/png")}, timeout=120)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (80, 60)  # the original size, as always
        missing = httpx.post(f"{base}/v1/inspect", files={"image": ("x.png", png_bytes(60, 80), "image/png")},
                             timeout=120)
        assert missing.status_code == 422 and missing.json()["error"]["code"] == "missing_field"
        assert missing.json()["error"]["fields"][0]["field"] == "category"
        assert inspect(base, category="nope").status_code == 404
        assert "bottle" in [c["name"] for c in httpx.get(f"{base}/v1/categories", timeout=10).json()["categories"]]
        assert api.poll() is None, "the API process died"
    finally:
        stop_process(api, 20)
    assert "ModuleNotFoundError" not in log_path.read_text(errors="replace")
