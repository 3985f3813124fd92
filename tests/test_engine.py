"""The batch pipeline (service/engine/pipeline.py): batch == one by one, failures stay in their slot, caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.core.types import InspectError, InspectRequest, InspectResult
from service.engine.pipeline import InspectionEngine
from service.settings import FiloSettings
from tests.conftest import synthetic_image


@pytest.fixture(scope="module")
def engine():
    return InspectionEngine.from_settings(FiloSettings(profile="demo", device="cpu"))


def _requests():
    return [
        InspectRequest(synthetic_image(240, 320, seed=1), "bottle", top_k=3),
        InspectRequest(synthetic_image(300, 300, seed=2), "pcb1"),
        InspectRequest(synthetic_image(518, 400, seed=3), "bottle", grounding=False),
        InspectRequest(synthetic_image(200, 260, seed=4), "candle", position="bottom left"),
    ]


def test_batch_equals_one_by_one_through_the_whole_pipeline(engine):
    reqs = _requests()
    batch = engine.inspect_batch(reqs)
    for req, res in zip(reqs, batch):
        single = engine.inspect_batch([req])[0]
        assert isinstance(res, InspectResult) and isinstance(single, InspectResult)
        np.testing.assert_allclose(res.anomaly_map, single.anomaly_map, atol=1e-5)
        assert res.score == pytest.approx(single.score, abs=1e-6)
        assert res.position == single.position
        assert [(b.frame, b.phrase, b.valid) for b in res.boxes] == [(b.frame, b.phrase, b.valid) for b in single.boxes]
        assert [t.description for t in res.top_types] == [t.description for t in single.top_types]
    assert len(batch[0].top_types) == 3
    assert batch[2].boxes == [] and batch[2].position is None  # grounding off: nothing detected, nine averaged
    assert batch[3].position == "bottom left"  # forced
    assert batch[1].boxes, "grounding on: the fallback keeps at least the best query"


def test_prepared_requests_give_the_same_results(engine):
    """Workers prepare the model input ahead of the batch (in other threads): it must change nothing."""
    plain = engine.inspect_batch(_requests())
    prepared = [engine.prepare(r) for r in _requests()]
    assert all(r.pixels is not None and tuple(r.pixels.shape) == (3, 518, 518) for r in prepared)
    assert [r.grounding_pixels is not None for r in prepared] == [True, True, False, True]  # 2: grounding off
    for a, b in zip(plain, engine.inspect_batch(prepared)):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        assert a.score == b.score and a.position == b.position
        assert [(x.frame, x.phrase) for x in a.boxes] == [(x.frame, x.phrase) for x in b.boxes]
    wrong = InspectRequest(synthetic_image(100, 100), "bottle", pixels=torch.zeros(3, 224, 224))
    (out,) = engine.inspect_batch([wrong])
    assert isinstance(out, InspectError) and out.code == "bad_image"


def test_warmup_runs_the_largest_batch_on_cuda_only(engine, monkeypatch):
    from service.engine.pipeline import EngineOptions, InspectionEngine, warmup_batch_size

    options = EngineOptions.from_settings(FiloSettings(profile="demo", max_batch_size=12))
    assert warmup_batch_size(options, "cuda:0") == 12 and warmup_batch_size(options, "cpu") == 1
    seen: list[int] = []
    real = engine.inspect_batch
    monkeypatch.setattr(engine, "inspect_batch", lambda reqs: seen.append(len(reqs)) or real(reqs))
    monkeypatch.setattr(InspectionEngine, "warmup_batch_size", property(lambda self: 3))
    engine.warmup()
    assert seen == [3]


def test_score_uses_the_map_before_suppression(engine):
    res = engine.inspect_batch([_requests()[0]])[0]
    assert res.score == pytest.approx((res.text_score + res.map_max) / 2, abs=1e-7)
    assert res.anomaly_map.max() <= res.map_max + 1e-7


def test_bad_requests_fail_alone(engine):
    reqs = _requests()[:2]
    reqs.insert(1, InspectRequest(synthetic_image(100, 100), "spaceship"))
    reqs.append(InspectRequest(synthetic_image(100, 100), "bottle", position="middle"))
    reqs.append(InspectRequest(np.zeros((10, 10), np.uint8), "bottle"))
    out = engine.inspect_batch(reqs)
    assert isinstance(out[0], InspectResult) and isinstance(out[2], InspectResult)
    assert isinstance(out[1], InspectError) and out[1].status == 404 and "bottle" in out[1].message
    assert isinstance(out[3], InspectError) and out[3].code == "bad_parameter"
    assert isinstance(out[4], InspectError) and out[4].code == "bad_image"


def test_a_crash_on_one_image_does_not_fail_its_neighbours(engine, monkeypatch):
    poison = synthetic_image(123, 321, seed=9)
    real_run = engine._run

    def flaky(reqs, cats):
        if any(r.image.shape == poison.shape for r in reqs):
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return real_run(reqs, cats)

    monkeypatch.setattr(engine, "_run", flaky)
    reqs = [InspectRequest(synthetic_image(200, 200, seed=1), "bottle"), InspectRequest(poison, "bottle"),
            InspectRequest(synthetic_image(210, 200, seed=2), "pcb1")]
    out = engine.inspect_batch(reqs)
    assert isinstance(out[0], InspectResult) and isinstance(out[2], InspectResult)
    assert isinstance(out[1], InspectError) and out[1].code == "model_error" and out[1].status == 500


def test_prompt_cache_round_trip(engine):
    engine.prepare_category("zipper")
    state = engine.cache_state()
    assert state and all(isinstance(v, bytes) for v in state.values())
    fresh = InspectionEngine(engine.model.__class__(engine.model.clip, engine.model.tokenizer, engine.model.heads,
                                                    518, "released"), engine.info, engine.catalog, "cpu")
    assert fresh.model.cached_banks() == {}
    assert fresh.load_cache_state(state) == len(state)
    cat = engine.catalog.get("zipper")
    a = engine.model.prompt_bank(cat.noun, cat.descriptions)
    b = fresh.model.cached_banks()[(cat.noun, tuple(cat.descriptions))]
    assert torch.equal(a.abnormal_suffix, b.abnormal_suffix) and torch.equal(a.normal_eot, b.normal_eot)


def test_bf16_autocast_stays_close_to_fp32(engine):
    req = [_requests()[2]]  # grounding off: compares FiLo's own arithmetic, not shifted boxes
    ref = engine.inspect_batch(req)[0]
    bf16 = engine.with_options(precision="bf16")
    low = bf16.inspect_batch(req)[0]
    assert engine.precision == engine.model.precision == "fp32"  # the other engine's choice changed nothing here
    assert bf16.precision == bf16.model.precision == "bf16" and bf16.model.heads is engine.model.heads
    assert low.anomaly_map.dtype == np.float32
    assert np.abs(low.anomaly_map - ref.anomaly_map).max() < 0.05
    assert len(np.unique(low.anomaly_map)) > 10_000  # maps computed in fp32, not quantised to bf16
