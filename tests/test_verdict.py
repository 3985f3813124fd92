"""One verdict: the category's rule is resolved once (by the engine) and every reader reports the same.

After every kind of threshold change (by hand with a review band, new references, calibrated from references
and from labelled images, learned from reviewed records, references removed), `GET /v1/categories/{name}`,
`GET .../thresholds` and `POST /v1/inspect` report the same threshold, source and review margin at once, with
no waiting window, and the inspection's `is_anomalous` / `needs_review` follow from them; in embedded mode and
in queue mode (a real redis-server, a real `filo worker` subprocess, a real API server).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import synthetic_image
from tests.service_fixtures import (  # noqa: F401
    ServerThread,
    demo_settings,
    learn_and_wait,
    own_redis,
    wait_ready,
    wait_until,
    worker_pool,
)

ADMIN = {"Authorization": "Bearer admin-v"}
CATEGORY = "bottle"


def _png(seed: int, h: int = 200, w: int = 240) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(h, w, seed=seed)).save(buf, format="PNG")
    return buf.getvalue()


def _files(field: str, blobs: list[bytes]) -> list:
    return [(field, (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]


def _settings(tmp_path, **kw):
    return demo_settings(state_dir=tmp_path, admin_key="admin-v", records_keep="all", request_timeout_s=60.0, **kw)


@contextmanager
def _embedded(tmp_path, _pool, _redis) -> Iterator[httpx.Client]:
    from service.api.app import create_app
    from service.backends.embedded import EmbeddedBackend

    settings = _settings(tmp_path)
    with ServerThread(create_app(settings, EmbeddedBackend(settings))) as srv:
        wait_ready(srv.url)
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            yield client


@contextmanager
def _queue(tmp_path, pool, redis) -> Iterator[httpx.Client]:
    from service.api.app import create_app
    from service.backends.redis_queue import RedisBackend

    worker = pool.start(redis.url)
    pool.wait_ready(worker)
    settings = _settings(tmp_path, redis_url=redis.url)
    with ServerThread(create_app(settings, RedisBackend(settings))) as srv:
        wait_ready(srv.url, 60)
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            wait_until(lambda: client.get("/v1/inspections").status_code == 200, 60, what="records ready")
            yield client


def _agree(client: httpx.Client, probe: bytes) -> dict:
    """The three readers, read right after a change answered: one threshold, source and margin."""
    detail = client.get(f"/v1/categories/{CATEGORY}").json()
    current = client.get(f"/v1/categories/{CATEGORY}/thresholds").json()["current"]
    r = client.post("/v1/inspect", data={"category": CATEGORY, "heatmap": "none"},
                    files={"image": ("p.png", probe, "image/png")})
    assert r.status_code == 200, r.text
    shown = r.json()
    assert (detail["threshold"], detail["threshold_source"]) == (current["threshold"], current["source"])
    assert (shown["threshold"], shown["threshold_source"]) == (current["threshold"], current["source"])
    assert detail["review_margin"] == current["review_margin"]
    margin, threshold, score = current["review_margin"], current["threshold"], shown["score"]
    assert shown["is_anomalous"] == (score >= threshold)
    assert shown["needs_review"] == (margin > 0 and abs(score - threshold) <= margin)
    return {"threshold": threshold, "source": current["source"], "margin": margin, "score": score,
            "needs_review": shown["needs_review"], "id": shown["request_id"]}


@pytest.mark.slow
@pytest.mark.parametrize("mode", [_embedded, pytest.param(_queue, marks=pytest.mark.redis)], ids=["embedded", "queue"])
def test_every_reader_reports_the_rule_the_inspection_applies(mode, tmp_path, worker_pool, own_redis):  # noqa: F811
    probe = _png(11, 240, 320)
    with mode(tmp_path, worker_pool, own_redis) as client:
        seen = [_agree(client, probe)]
        assert seen[-1]["source"] == "default" and seen[-1]["margin"] == 0.0

        # by hand, with a review band wide enough that the probe needs a person
        r = client.put(f"/v1/categories/{CATEGORY}/threshold", headers=ADMIN,
                       json={"threshold": seen[0]["score"] - 0.01, "review_margin": 0.05})
        assert r.status_code == 200, r.text
        seen.append(_agree(client, probe))
        assert seen[-1]["source"] == "manual" and seen[-1]["margin"] == 0.05 and seen[-1]["needs_review"]

        # references: a manual threshold holds; calibrated from them, the references rule (band kept)
        refs = [_png(500 + i) for i in range(3)]
        assert client.put(f"/v1/categories/{CATEGORY}/references", headers=ADMIN,
                          files=_files("images", refs)).status_code == 200
        seen.append(_agree(client, probe))
        assert seen[-1]["source"] == "manual"
        r = client.post(f"/v1/categories/{CATEGORY}/calibrate", headers=ADMIN)
        assert r.status_code == 200, r.text
        seen.append(_agree(client, probe))
        assert seen[-1]["source"] == "references" and r.json()["threshold"] == seen[-1]["threshold"]
        assert seen[-1]["margin"] == 0.05

        # calibrated from labelled images
        good, bad = [_png(600 + i) for i in range(2)], [_png(700 + i) for i in range(2)]
        r = client.post(f"/v1/categories/{CATEGORY}/calibrate", headers=ADMIN,
                        files=_files("good", good) + _files("defective", bad))
        assert r.status_code == 200, r.text
        seen.append(_agree(client, probe))
        assert seen[-1]["source"] == "labelled" and seen[-1]["threshold"] == r.json()["threshold"]

        # learned from reviewed records (the probes above were kept: records_keep=all)
        ids = [s["id"] for s in seen]
        wait_until(lambda: all(client.get(f"/v1/inspections/{i}").status_code == 200 for i in ids), 60,
                   what="the probes' records")
        for i, label in zip(ids, ["good", "good", "defect", "defect", "good"], strict=True):
            assert client.post(f"/v1/inspections/{i}/review", headers=ADMIN, json={"label": label}).status_code == 200
        learn_and_wait(client, CATEGORY, ADMIN)
        seen.append(_agree(client, probe))
        assert seen[-1]["source"] == "learned"

        # references removed: the learned threshold lapses (it held for the old set), the band stays
        assert client.delete(f"/v1/categories/{CATEGORY}/references", headers=ADMIN).status_code == 200
        seen.append(_agree(client, probe))
        assert seen[-1]["source"] == "default" and seen[-1]["margin"] == 0.05

        # the history (newest first): each change's `previous` is the value the change before it left
        history = client.get(f"/v1/categories/{CATEGORY}/thresholds").json()["history"][::-1]
        values = [h["threshold"] for h in history]
        assert [h["previous"] for h in history[1:]] == values[:-1]
        assert history[0]["previous"] == seen[0]["threshold"] and values[-1] == seen[-1]["threshold"]
        assert {s["threshold"] for s in seen} <= {seen[0]["threshold"], *values}  # every value seen is in it
        sources = [s["source"] for s in seen]
        assert sources == ["default", "manual", "manual", "references", "labelled", "learned", "default"]
        assert np.isfinite([s["threshold"] for s in seen]).all()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [_embedded, pytest.param(_queue, marks=pytest.mark.redis)], ids=["embedded", "queue"])
def test_concurrent_threshold_changes_each_write_their_own_history_entry(mode, tmp_path, worker_pool,  # noqa: F811
                                                                        own_redis):  # noqa: F811
    """20 admins setting the threshold at once: each change is one step under the category's lock, so every entry
    records the value its request asked for, and each entry's `previous` is the entry before it's value."""
    from concurrent.futures import ThreadPoolExecutor

    wanted = [round(0.30 + 0.02 * i, 2) for i in range(20)]
    with mode(tmp_path, worker_pool, own_redis) as client:
        def put(value: float) -> int:
            return client.put(f"/v1/categories/{CATEGORY}/threshold", headers=ADMIN,
                              json={"threshold": value}).status_code

        with ThreadPoolExecutor(max_workers=20) as pool:
            assert list(pool.map(put, wanted)) == [200] * 20
        history = client.get(f"/v1/categories/{CATEGORY}/thresholds").json()["history"][::-1]
        final = client.get(f"/v1/categories/{CATEGORY}").json()["threshold"]
    assert len(history) == 20
    assert all(h["threshold"] == h["detail"]["requested"]["threshold"] for h in history), history
    assert sorted(h["threshold"] for h in history) == wanted  # every request wrote exactly its own value
    assert [h["previous"] for h in history[1:]] == [h["threshold"] for h in history[:-1]]  # the chain holds
    assert history[0]["previous"] == 0.5 and history[-1]["threshold"] == final
