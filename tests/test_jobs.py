"""Learning as a background job, and reference rebuilds beside the batches.

POST .../learn answers 202 with a job that any API process can report on (GET /v1/jobs/{id}: state, stage,
progress, result or error), one job per category at a time (409 with the running job's id); and a category's
new reference memories are built on a thread of their own and swapped in between batches, so inspections of
other categories go on while they build. Embedded mode (the job store in the process) and the Redis store
(queue mode's) are both exercised.
"""

from __future__ import annotations

import asyncio
import io
import threading

import httpx
import pytest
from PIL import Image

from service.backends.jobs import Job, JobRunning, MemoryJobs, RedisJobs
from service.core.keys import Keys
from tests.conftest import synthetic_image
from tests.service_fixtures import (  # noqa: F401
    ServerThread,
    demo_settings,
    learn_and_wait,
    own_redis,
    wait_ready,
    wait_until,
)

ADMIN = {"Authorization": "Bearer admin-j"}


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(200, 240, seed=seed)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def server(tmp_path):
    from service.api.app import create_app
    from service.backends.embedded import EmbeddedBackend

    settings = demo_settings(state_dir=tmp_path, admin_key="admin-j", records_keep="all")
    backend = EmbeddedBackend(settings)
    with ServerThread(create_app(settings, backend)) as srv:
        wait_ready(srv.url)
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            yield client, backend


def _reviewed(client: httpx.Client, category: str, labels: list[str]) -> None:
    ids = []
    for i in range(len(labels)):
        r = client.post("/v1/inspect", data={"category": category, "heatmap": "none"},
                        files={"image": ("x.png", _png(300 + i), "image/png")})
        assert r.status_code == 200, r.text
        ids.append(r.json()["request_id"])
    wait_until(lambda: all(client.get(f"/v1/inspections/{i}").status_code == 200 for i in ids), 60, what="records")
    for i, label in zip(ids, labels, strict=True):
        assert client.post(f"/v1/inspections/{i}/review", headers=ADMIN, json={"label": label}).status_code == 200


def test_learn_is_a_job_one_per_category_followed_to_its_result(server):
    client, backend = server
    _reviewed(client, "bottle", ["good", "defect", "good", "defect"])
    gate = threading.Event()
    real = backend.engine.inspect_batch

    def held(requests):  # the learn's rescoring waits here until the test has seen the job run
        gate.wait(60)
        return real(requests)

    backend.engine.inspect_batch = held
    try:
        r = client.post("/v1/categories/bottle/learn", headers=ADMIN)
        assert r.status_code == 202, r.text
        job = r.json()
        again = client.post("/v1/categories/bottle/learn", headers=ADMIN)
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_running"
        assert again.json()["error"]["job_id"] == job["id"]
        running = client.get(f"/v1/jobs/{job['id']}", headers=ADMIN).json()
        assert running["state"] == "running" and running["category"] == "bottle"
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 401  # admin only
    finally:
        gate.set()
        backend.engine.inspect_batch = real
    wait_until(lambda: client.get(f"/v1/jobs/{job['id']}", headers=ADMIN).json()["state"] != "running", 120,
               what="the job's end")
    done = client.get(f"/v1/jobs/{job['id']}", headers=ADMIN).json()
    assert done["state"] == "succeeded", done
    assert done["result"]["reviewed"] == 4 and done["result"]["threshold"]["source"] == "learned"
    assert done["stage"] == "scoring the reviewed images again" and done["done"] == done["total"] == 4
    assert client.get("/v1/categories/bottle/thresholds", headers=ADMIN).json()["current"]["source"] == "learned"
    # the category is free again; a dry run still answers the plan at once
    assert client.post("/v1/categories/bottle/learn", params={"dry_run": "true"}, headers=ADMIN).status_code == 200
    assert learn_and_wait(client, "bottle", ADMIN)["reviewed"] == 4
    assert client.get("/v1/jobs/nope", headers=ADMIN).status_code == 404


def test_a_failed_job_says_why(server):
    client, backend = server
    _reviewed(client, "candle", ["good", "defect"])
    real = backend.engine.inspect_batch
    backend.engine.inspect_batch = lambda requests: (_ for _ in ()).throw(RuntimeError("the GPU fell over"))
    try:
        r = client.post("/v1/categories/candle/learn", headers=ADMIN)
        assert r.status_code == 202
        job_id = r.json()["id"]
        wait_until(lambda: client.get(f"/v1/jobs/{job_id}", headers=ADMIN).json()["state"] != "running", 60,
                   what="the job's end")
    finally:
        backend.engine.inspect_batch = real
    failed = client.get(f"/v1/jobs/{job_id}", headers=ADMIN).json()
    # the rescoring's own error, as the service answered it, is the job's
    assert failed["state"] == "failed" and failed["error"]["code"] == "inspection_failed"
    assert "RuntimeError" in failed["error"]["message"] and failed["result"] is None
    assert client.post("/v1/categories/candle/learn", params={"dry_run": "true"}, headers=ADMIN).status_code == 200


def test_other_categories_inspect_while_a_reference_memory_builds(server):
    """The memory of new references is built beside the batches: an inspection of another category is answered
    while the build is held, and the build itself ran on a thread other than the engine's."""
    client, backend = server
    refs = backend.engine.references
    gate, seen = threading.Event(), {}
    real_prebuild, real_install = refs.prebuild, refs.install

    def prebuild(category, wanted):
        seen["build"] = threading.current_thread().name
        gate.wait(60)
        return real_prebuild(category, wanted)

    def install(category, wanted, memory):
        seen["install"] = threading.current_thread().name
        return real_install(category, wanted, memory)

    refs.prebuild, refs.install = prebuild, install
    put = threading.Thread(target=lambda: seen.setdefault("put", client.put(
        "/v1/categories/bottle/references", headers=ADMIN,
        files=[("images", (f"{i}.png", _png(700 + i), "image/png")) for i in range(3)]).status_code))
    put.start()
    try:
        wait_until(lambda: "build" in seen, 30, what="the build to start")
        r = client.post("/v1/inspect", data={"category": "candle", "heatmap": "none"},
                        files={"image": ("x.png", _png(1), "image/png")})
        assert r.status_code == 200 and "put" not in seen  # answered while the build is still held
    finally:
        gate.set()
        put.join(60)
        refs.prebuild, refs.install = real_prebuild, real_install
    assert seen["put"] == 200
    assert seen["build"] != seen["install"] and seen["install"].startswith("filo-engine")
    r = client.post("/v1/inspect", data={"category": "bottle", "heatmap": "none"},
                    files={"image": ("x.png", _png(1), "image/png")})
    assert r.json()["references"] == 3


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_job_stores_claim_once_per_category_and_free_it_when_finished(store, own_redis):  # noqa: F811
    async def scenario() -> None:
        client = None
        if store == "memory":
            jobs = MemoryJobs()
        else:
            from redis.asyncio import Redis

            client = Redis.from_url(own_redis.url)
            jobs = RedisJobs(client, Keys("filo:jobs-test", "g"), claim_ttl_s=0.5)
        job = await jobs.claim("learn", "bottle", "admin")
        with pytest.raises(JobRunning) as running:
            await jobs.claim("learn", "bottle", "admin")
        assert running.value.details == {"job_id": job.id}
        other = await jobs.claim("learn", "candle", "admin")  # another category: its own job
        await jobs.update(Job(**{**job.__dict__, "stage": "scoring", "done": 1, "total": 2}))
        assert (await jobs.get(job.id)).done == 1
        await jobs.update(Job(**{**job.__dict__, "state": "succeeded", "result": {"ok": True}}))
        assert (await jobs.get(job.id)).state == "succeeded"
        again = await jobs.claim("learn", "bottle", "admin")  # free again
        assert again.id != job.id
        if client is not None:  # a pod that dies stops refreshing: its job reads as lost, the category frees
            await asyncio.sleep(0.7)
            lost = await jobs.get(other.id)
            assert lost.state == "lost" and lost.error["code"] == "job_lost"
            assert (await jobs.claim("learn", "candle", "admin")).id != other.id
            await client.aclose()

    asyncio.run(scenario())
