"""Few-shot references through the engine: exactness without them, batches, thresholds, caches, storage."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models import anomaly_maps as am
from service.catalog.references import MemoryCache, ReferenceImage, ReferenceSet
from service.catalog.thresholds import ThresholdRecord, reference_threshold
from service.core.keys import cache_key, prompt_bank_key
from service.core.types import InspectRequest, InspectResult
from service.engine.pipeline import InspectionEngine
from tests.conftest import synthetic_image
from tests.service_fixtures import demo_settings, own_redis, worker_pool  # noqa: F401


@pytest.fixture(scope="module")
def engine():
    return InspectionEngine.from_settings(demo_settings())


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _refs(n: int = 3, seed: int = 100) -> ReferenceSet:
    images = [synthetic_image(200, 240, seed=seed + i) for i in range(n)]
    return ReferenceSet().added(ReferenceImage.from_bytes(_png(a), a.shape[1], a.shape[0]) for a in images)


def _inspect(engine, *reqs: InspectRequest) -> list[InspectResult]:
    out = engine.inspect_batch(list(reqs))
    assert all(isinstance(r, InspectResult) for r in out), out
    return out


def test_without_references_every_output_is_the_plain_zero_shot_path(engine):
    img = synthetic_image(240, 320, seed=5)
    (res,) = _inspect(engine, InspectRequest(img, "bottle"))
    # the plain path, by hand: one forward, FiLo's map and score, nothing else
    cat = engine.catalog.get("bottle")
    pixels = engine.preprocess(Image.fromarray(img))[None]
    with torch.no_grad():
        out = engine.model(pixels, [engine.model.prompt_bank(cat.noun, cat.descriptions)], [None])
    np.testing.assert_array_equal(res.anomaly_map, out.anomaly_map[0].float().numpy())
    want = am.image_score(out.text_probs[:, 1].float(), out.anomaly_map.float().flatten(1).max(1).values)
    assert res.score == float(want[0])
    assert res.references == 0 and res.threshold == 0.5 and res.threshold_source == "default"
    # references installed and removed again: bit-identical to before
    engine.references.set("bottle", _refs())
    (fused,) = _inspect(engine, InspectRequest(img, "bottle"))
    assert fused.references == 3 and not np.array_equal(fused.anomaly_map, res.anomaly_map)
    assert fused.anomaly_map.min() >= 0 and fused.anomaly_map.max() <= 1
    engine.references.clear("bottle")
    (again,) = _inspect(engine, InspectRequest(img, "bottle"))
    np.testing.assert_array_equal(again.anomaly_map, res.anomaly_map)
    assert again.score == res.score and again.references == 0


def test_a_batch_mixing_categories_with_and_without_references_equals_one_by_one(engine):
    engine.references.set("bottle", _refs())
    try:
        reqs = [InspectRequest(synthetic_image(240, 320, seed=1), "bottle"),
                InspectRequest(synthetic_image(300, 300, seed=2), "candle"),
                InspectRequest(synthetic_image(260, 200, seed=3), "bottle"),
                InspectRequest(synthetic_image(200, 260, seed=4), "candle")]
        batch = _inspect(engine, *reqs)
        assert [r.references for r in batch] == [3, 0, 3, 0]
        for req, res in zip(reqs, batch):
            (single,) = _inspect(engine, req)
            np.testing.assert_allclose(res.anomaly_map, single.anomaly_map, atol=1e-5)
            assert res.score == pytest.approx(single.score, abs=1e-6)
            assert res.references == single.references
    finally:
        engine.references.clear("bottle")


def test_an_explicit_memory_on_the_request_is_used(engine):
    refs = _refs(2)
    engine.references.set("candle", refs)
    memory = engine.references.memory("candle")
    engine.references.clear("candle")
    img = synthetic_image(240, 320, seed=9)
    (res,) = _inspect(engine, InspectRequest(img, "candle", references=memory))
    engine.references.set("candle", refs)
    (same,) = _inspect(engine, InspectRequest(img, "candle"))
    engine.references.clear("candle")
    np.testing.assert_array_equal(res.anomaly_map, same.anomaly_map)
    assert res.references == 2


def test_thresholds_default_references_rule_and_labelled_only_for_its_reference_set(engine):
    img = synthetic_image(240, 320, seed=6)
    refs = _refs(3)
    engine.references.set("bottle", refs)
    try:
        memory = engine.references.memory("bottle")
        assert len(memory.loo_scores) == 3
        engine.references.set_threshold("bottle", ThresholdRecord("references"))
        (res,) = _inspect(engine, InspectRequest(img, "bottle"))
        assert res.threshold_source == "references"
        assert res.threshold == pytest.approx(reference_threshold(memory.loo_scores))
        assert res.threshold > max(memory.loo_scores)
        engine.references.set_threshold("bottle", ThresholdRecord("labelled", 0.42, refs.digest, 2, 2))
        (res,) = _inspect(engine, InspectRequest(img, "bottle"))
        assert (res.threshold, res.threshold_source) == (0.42, "labelled")
        engine.references.set("bottle", _refs(2))  # other references: that labelled cut no longer holds
        (res,) = _inspect(engine, InspectRequest(img, "bottle"))
        assert (res.threshold, res.threshold_source) == (0.5, "default")
    finally:
        engine.references.clear("bottle")
        engine.references.set_threshold("bottle", None)


def test_memory_is_bounded_and_an_evicted_memory_is_rebuilt_identically(engine):
    old = engine.references.cache
    refs = _refs(2)
    try:
        engine.references.set("bottle", refs)
        nbytes = engine.references.memory_bytes("bottle")
        assert nbytes > 0
        engine.references.cache = MemoryCache(old.model_key, budget_bytes=int(nbytes * 1.5))
        engine.references.set("bottle", refs)
        img = synthetic_image(240, 320, seed=7)
        (first,) = _inspect(engine, InspectRequest(img, "bottle"))
        engine.references.set("candle", _refs(2, seed=300))  # pushes bottle's memory out
        assert engine.references.cache.categories() == ["candle"] and engine.references.cache.evictions == 1
        (rebuilt,) = _inspect(engine, InspectRequest(img, "bottle"))
        np.testing.assert_array_equal(first.anomaly_map, rebuilt.anomaly_map)
    finally:
        engine.references.cache = old
        engine.references.clear("bottle")
        engine.references.clear("candle")


def test_memory_cache_key_names_the_model_version_and_settings():
    info = {"version": "filo-demo-tiny-abc", "backbone": "b", "clip_weights": "w", "image_size": 518,
            "tap_layout": "released", "checkpoint_sha256": "1"}
    base = cache_key(info, {"match": "position"})
    assert base == cache_key(dict(info), {"match": "position"})
    assert base != cache_key({**info, "checkpoint_sha256": "2"}, {"match": "position"})
    assert base != cache_key({**info, "backbone": "other"}, {"match": "position"})
    assert base != cache_key(info, {"match": "global"})


def test_one_function_keys_both_caches_and_the_persisted_keys_keep_their_bytes(engine):
    """The prompt cache (persisted, shared by pods of different versions) and the reference memories are keyed
    by `cache_key`; the persisted forms are the bytes older pods write and read."""
    from descriptions import Category

    info = {"name": "filo-demo-tiny", "version": "filo-demo-tiny-abc", "backbone": "FiLo-Tiny-CLIP",
            "clip_weights": "random", "image_size": 518}
    assert cache_key(info) == "filo-demo-tiny-cf0ca82aa8853963"
    assert cache_key({"version": "v1"}) == "model-f6586708ae189188"
    gear = Category(name="gear", noun="gear", descriptions=("chipped tooth", "rust spot \u00b0"))
    assert prompt_bank_key(info, gear) == "FiLo-Tiny-CLIP:random:98762897f01f7008"
    a, b = ReferenceImage.from_bytes(b"one", 3, 4), ReferenceImage.from_bytes(b"two", 5, 6)
    assert (a.id, b.id, ReferenceSet((a, b)).digest) == ("7692c3ad3540bb80", "3fc4ccfe745870e2", "3045b5b896c3f852")
    refs = engine.references
    settings = {"max_patches": refs.max_patches, "match": refs.match, "radius": refs.radius, "weight": refs.weight}
    assert refs.cache.model_key == cache_key(engine.model_info(), settings)
    assert refs.cache.model_key.startswith(f"{engine.model_info()['name']}-")  # one format for both


def test_the_engine_configures_its_references_once(monkeypatch):
    """from_settings hands its settings to the references at construction: one configure, with those settings."""
    from service.engine.references import EngineReferences

    calls = []
    configure = EngineReferences.configure

    def counted(self, settings):
        calls.append(settings)
        configure(self, settings)

    monkeypatch.setattr(EngineReferences, "configure", counted)
    settings = demo_settings(reference_weight=0.5, reference_memory_mb=64)
    engine = InspectionEngine.from_settings(settings)
    assert calls == [settings]
    assert engine.references.weight == 0.5 and engine.references.cache.budget_bytes == 64 * 2**20


def test_reference_set_ids_dedupe_remove_and_json_round_trip():
    a = ReferenceImage.from_bytes(b"one", 3, 4)
    b = ReferenceImage.from_bytes(b"two", 5, 6)
    refs = ReferenceSet().added([a, b, ReferenceImage.from_bytes(b"one", 3, 4)])
    assert refs.ids() == [a.id, b.id] and len(refs) == 2
    assert ReferenceSet.from_json(refs.to_json()) == refs
    assert refs.without(a.id).ids() == [b.id] and refs.without(a.id).digest != refs.digest
    assert a.item() == {"id": a.id, "width": 3, "height": 4, "bytes": 3}
    with pytest.raises(ValueError):
        ReferenceSet.from_json(b'{"format": "other"}')


# --- the HTTP API, embedded mode (a real server and engine) ------------------------------------------------

API_KEY, ADMIN_KEY = "key-r", "admin-r"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _api_settings(state_dir, **kw):
    base = {"state_dir": state_dir, "api_keys": [API_KEY], "admin_key": ADMIN_KEY, "reference_max_images": 4}
    base.update(kw)
    return demo_settings(**base)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    import httpx

    from service.api.app import create_app
    from service.backends.embedded import EmbeddedBackend
    from tests.service_fixtures import ServerThread, wait_ready

    state_dir = tmp_path_factory.mktemp("refs-state")
    settings = _api_settings(state_dir)
    with ServerThread(create_app(settings, EmbeddedBackend(settings))) as srv:
        wait_ready(srv.url)
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            yield client, state_dir


def _files(field: str, blobs: list[bytes]) -> list:
    return [(field, (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]


def _inspect_api(client, image: bytes, category: str = "bottle") -> dict:
    r = client.post("/v1/inspect", headers=AUTH, data={"category": category, "heatmap": "none"},
                    files={"image": ("x.png", image, "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def test_api_references_lifecycle_errors_and_exact_zero_shot_after_delete(api):
    client, _ = api
    probe = _png(synthetic_image(240, 320, seed=11))
    zero = _inspect_api(client, probe)
    assert zero["references"] == 0 and zero["threshold_source"] == "default"
    blobs = [_png(synthetic_image(200, 240, seed=100 + i)) for i in range(3)]
    assert client.put("/v1/categories/bottle/references", files=_files("images", blobs[:1])).status_code == 401
    r = client.put("/v1/categories/nope/references", headers=ADMIN, files=_files("images", blobs))
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_category"
    r = client.put("/v1/categories/bottle/references", headers=ADMIN, files=_files("images", blobs))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["category"] == "bottle" and body["references"] == 3 and body["memory_bytes"] > 0
    assert [set(it) for it in body["items"]] == [{"id", "width", "height", "bytes"}] * 3
    assert (body["items"][0]["width"], body["items"][0]["height"]) == (240, 200)
    # a part that is not an image: refused, and nothing of that request stored
    r = client.put("/v1/categories/bottle/references", headers=ADMIN,
                   files=_files("images", [_png(synthetic_image(100, 100, seed=7))]) + [
                       ("images", ("bad.png", b"not an image", "image/png"))])
    assert r.status_code == 415, r.text
    assert client.get("/v1/categories/bottle/references", headers=AUTH).json()["references"] == 3
    # over the maximum (4): 413, nothing stored
    more = [_png(synthetic_image(120, 120, seed=200 + i)) for i in range(2)]
    r = client.put("/v1/categories/bottle/references", headers=ADMIN, files=_files("images", more))
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_references"
    got = client.get("/v1/categories/bottle/references", headers=AUTH).json()
    assert got["references"] == 3 and got["items"] == body["items"] and got["memory_bytes"] == body["memory_bytes"]
    few = _inspect_api(client, probe)
    assert few["references"] == 3 and few["score"] != zero["score"]
    # one by id, then all
    r = client.delete(f"/v1/categories/bottle/references/{body['items'][0]['id']}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["references"] == 2
    assert client.delete("/v1/categories/bottle/references/unknown", headers=ADMIN).status_code == 404
    r = client.delete("/v1/categories/bottle/references", headers=ADMIN)
    assert r.status_code == 200 and r.json()["references"] == 0 and r.json()["items"] == []
    again = _inspect_api(client, probe)
    assert again["score"] == zero["score"] and again["references"] == 0  # exactly zero-shot again


def test_a_deleted_category_takes_its_references_and_threshold_with_it(api):
    client, _ = api
    body = {"noun": "rubber gasket", "descriptions": ["torn lip", "air bubble"]}
    assert client.put("/v1/categories/gasket", headers=ADMIN, json=body).status_code == 200
    refs = [_png(synthetic_image(200, 240, seed=500 + i)) for i in range(3)]
    assert client.put("/v1/categories/gasket/references", headers=ADMIN,
                      files=_files("images", refs)).json()["references"] == 3
    assert client.post("/v1/categories/gasket/calibrate", headers=ADMIN).status_code == 200
    probe = _png(synthetic_image(240, 320, seed=12))
    assert _inspect_api(client, probe, "gasket")["references"] == 3
    assert client.delete("/v1/categories/gasket", headers=ADMIN).status_code in (200, 204)
    assert client.put("/v1/categories/gasket", headers=ADMIN, json=body).status_code == 200
    assert client.get("/v1/categories/gasket/references", headers=AUTH).json()["references"] == 0
    res = _inspect_api(client, probe, "gasket")
    assert res["references"] == 0 and res["threshold_source"] == "default"
    assert client.get("/v1/categories/gasket", headers=AUTH).json()["threshold_source"] in (None, "default")


def test_redis_store_deletes_a_categorys_extras_with_it(own_redis):  # noqa: F811
    import asyncio

    from redis.asyncio import Redis

    from descriptions import Category
    from service.catalog.store import CATEGORY_EXTRA_KINDS, RedisCategoryStore
    from service.core.keys import Keys

    async def scenario() -> tuple[list[bytes | None], list[bytes | None]]:
        redis = Redis.from_url(own_redis.url)
        keys = Keys.from_settings(demo_settings())
        store = RedisCategoryStore(redis, keys)
        await redis.set(keys.categories_version, 1)  # a published catalog
        await store.put(Category(name="gasket", noun="gasket", descriptions=["torn lip"]))
        for kind in CATEGORY_EXTRA_KINDS:
            await store.put_extra("gasket", kind, b"{}")
        await store.put_extra("other", "references", b"{}")
        before = [await redis.get(keys.category_extra("gasket", k)) for k in CATEGORY_EXTRA_KINDS]
        assert await store.delete("gasket")
        after = [await redis.get(keys.category_extra("gasket", k)) for k in CATEGORY_EXTRA_KINDS]
        assert await redis.get(keys.category_extra("other", "references")) == b"{}"
        await redis.aclose()
        return before, after

    before, after = asyncio.run(scenario())
    assert before == [b"{}"] * len(CATEGORY_EXTRA_KINDS) and after == [None] * len(CATEGORY_EXTRA_KINDS)


def test_api_calibration_labelled_and_from_references_and_restart_keeps_them(api, tmp_path):
    client, state_dir = api
    good = [_png(synthetic_image(220, 220, seed=300 + i)) for i in range(2)]
    bad = [_png(np.zeros((220, 220, 3), np.uint8) + 255)]
    r = client.post("/v1/categories/candle/calibrate", headers=ADMIN)
    assert r.status_code == 422 and r.json()["error"]["code"] == "not_enough_references"
    r = client.post("/v1/categories/candle/calibrate", headers=ADMIN,
                    files=_files("good", good) + _files("defective", bad))
    assert r.status_code == 200, r.text
    cal = r.json()
    assert cal["threshold_source"] == "labelled" and (cal["n_good"], cal["n_defective"]) == (2, 1)
    scores = cal["scores"]["good"] + cal["scores"]["defective"]
    from service.catalog.thresholds import f1_max_threshold

    assert (cal["threshold"], cal["f1"]) == pytest.approx(f1_max_threshold(scores, [0, 0, 1]))
    res = _inspect_api(client, good[0], "candle")
    assert (res["threshold"], res["threshold_source"]) == (cal["threshold"], "labelled")
    assert res["is_anomalous"] == (res["score"] >= cal["threshold"])
    cat = client.get("/v1/categories/candle", headers=AUTH).json()
    assert (cat["threshold"], cat["threshold_source"], cat["references"]) == (cal["threshold"], "labelled", 0)
    # from references alone
    refs = [_png(synthetic_image(200, 240, seed=400 + i)) for i in range(3)]
    assert client.put("/v1/categories/candle/references", headers=ADMIN, files=_files("images", refs)).status_code == 200
    assert _inspect_api(client, good[0], "candle")["threshold_source"] == "default"  # labelled for other refs
    r = client.post("/v1/categories/candle/calibrate", headers=ADMIN)
    assert r.status_code == 200, r.text
    ref_cal = r.json()
    assert ref_cal["threshold_source"] == "references" and ref_cal["n_good"] == 3
    res = _inspect_api(client, good[1], "candle")
    assert res["threshold_source"] == "references" and res["threshold"] == pytest.approx(ref_cal["threshold"])
    assert client.get("/v1/categories/candle", headers=AUTH).json()["threshold_source"] == "references"
    # a restarted server on the same state dir has the references and the threshold
    import httpx

    from service.api.app import create_app
    from service.backends.embedded import EmbeddedBackend
    from tests.service_fixtures import ServerThread, wait_ready

    settings = _api_settings(state_dir)
    with ServerThread(create_app(settings, EmbeddedBackend(settings))) as srv:
        wait_ready(srv.url)
        with httpx.Client(base_url=srv.url, timeout=120) as other:
            again = _inspect_api(other, good[1], "candle")
            assert again["references"] == 3 and again["score"] == res["score"]
            assert (again["threshold"], again["threshold_source"]) == (res["threshold"], "references")
    assert client.delete("/v1/categories/candle/references", headers=ADMIN).status_code == 200


# --- queue mode: a real redis-server, a real `filo worker` subprocess, a real API server ----------------


@pytest.mark.redis
def test_queue_mode_references_reach_the_worker_survive_flushall_and_delete_restores_zero_shot(
        own_redis, worker_pool):  # noqa: F811
    import httpx

    from service.api.app import create_app
    from service.backends.redis_queue import RedisBackend
    from service.core.keys import Keys
    from tests.service_fixtures import ServerThread, wait_ready

    worker = worker_pool.start(own_redis.url)
    worker_pool.wait_ready(worker)
    settings = demo_settings(redis_url=own_redis.url, request_timeout_s=20.0)
    probe = _png(synthetic_image(240, 320, seed=21))
    blobs = [_png(synthetic_image(200, 240, seed=500 + i)) for i in range(3)]
    with ServerThread(create_app(settings, RedisBackend(settings))) as srv:
        wait_ready(srv.url, 30)
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            zero = _inspect_api(client, probe)
            assert zero["references"] == 0
            r = client.put("/v1/categories/bottle/references", files=_files("images", blobs))
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["references"] == 3 and body["workers_ready"] == body["workers_live"] == 1
            assert body["memory_bytes"] > 0  # as the worker built it
            few = _inspect_api(client, probe)
            assert few["references"] == 3 and few["score"] != zero["score"]
            assert client.post("/v1/categories/bottle/calibrate").json()["threshold_source"] == "references"

            own_redis.client().flushall()  # the worker re-publishes the catalog, references included
            wait_ready(srv.url, 20)
            key = Keys.from_settings(settings).category_extra("bottle", "references")
            assert own_redis.client().exists(key)
            healed = _inspect_api(client, probe)
            assert healed["references"] == 3 and healed["score"] == few["score"]
            assert healed["threshold_source"] == "references"
            assert client.get("/v1/categories/bottle/references").json()["references"] == 3

            assert client.delete("/v1/categories/bottle/references").status_code == 200
            again = _inspect_api(client, probe)
            assert again["references"] == 0 and again["score"] == zero["score"]
