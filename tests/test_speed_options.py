"""The GPU speed options against the plain path, on the CPU (their CUDA halves are in tests/test_cuda.py).

- FILO_COMPILE: torch.compile of the image encoder equals the eager encoder;
- FILO_CUDA_GRAPHS: batches padded to bucket sizes give the unpadded results, through the compiled encoder
  too (CUDA graphs themselves only exist on a GPU: tests/test_cuda.py);
- FILO_PIN_MEMORY: the pinned, non-blocking copy changes no value;
- FILO_GROUNDING_TEXT_CACHE: reaches the detector and changes no result;
- FILO_GPU_IMAGE_PATH: the wiring (decode to a tensor, prepare from it, render from it) runs on CPU tensors
  here, forced on, through the embedded server and the queue worker, and stays within the bounds that
  tests/test_gpu_imaging.py measures for each step.
"""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from filo_lab.bench.model import build_random_engine, time_batches
from service.core.types import InspectRequest, InspectResult
from service.engine.buckets import BucketedEncoder, bucket_for, bucket_sizes
from service.settings import FiloSettings
from tests.conftest import synthetic_image


def _jpeg(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(h, w, seed=seed)).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.mark.slow
def test_compiled_encoder_equals_eager():
    eager = build_random_engine("tiny", "cpu", grounding=False)
    compiled = eager.with_options(compile=True)
    assert compiled.compiled and type(compiled.encoder).__name__ == "OptimizedModule"
    assert compiled.model.encoder is eager.model.encoder is eager.encoder  # the model itself is never replaced
    reqs = [InspectRequest(synthetic_image(240, 320, seed=s), c, grounding=False) for s, c in ((1, "bottle"), (2, "pcb1"))]
    for a, b in zip(eager.inspect_batch(reqs), compiled.inspect_batch(reqs), strict=True):
        assert isinstance(a, InspectResult) and isinstance(b, InspectResult)
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-4
        assert abs(a.score - b.score) < 1e-5


def test_bucket_sizes_are_powers_of_two_up_to_the_largest_batch():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(8) == (1, 2, 4, 8)
    assert bucket_sizes(12) == (1, 2, 4, 8, 12)
    assert [bucket_for(n, bucket_sizes(12)) for n in (1, 3, 5, 9, 12, 20)] == [1, 4, 8, 12, 12, 20]


def _mixed_requests(n: int) -> list[InspectRequest]:
    cats = ("bottle", "pcb1", "screw")
    return [InspectRequest(synthetic_image(200 + 16 * s, 260, seed=s), cats[s % 3], grounding=False) for s in range(n)]


def _assert_same_results(a_results, b_results, map_tol: float, score_tol: float) -> None:
    for a, b in zip(a_results, b_results, strict=True):
        assert isinstance(a, InspectResult) and isinstance(b, InspectResult)
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < map_tol
        assert abs(a.score - b.score) < score_tol
        assert [t.description for t in a.top_types] == [t.description for t in b.top_types]


def test_padded_batches_give_the_unpadded_results():
    """Three images padded to a bucket of 4 (and 1 to 4): the blank images change nothing in the others."""
    plain = build_random_engine("tiny", "cpu", grounding=False)
    padded = build_random_engine("tiny", "cpu", grounding=False)
    padded.encoder = BucketedEncoder(padded.model.encoder, (4, 8))
    assert padded.model.tap_layout == plain.model.tap_layout
    for n in (3, 1, 4):
        reqs = _mixed_requests(n)
        _assert_same_results(plain.inspect_batch(reqs), padded.inspect_batch(reqs), 1e-5, 1e-6)
    # past the largest bucket the batch runs as it is
    zeros = torch.zeros(9, 3, plain.image_size, plain.image_size)
    assert padded.model.encode_images(zeros, padded.encoder).global_feature.shape[0] == 9


@pytest.mark.slow
def test_cuda_graph_option_compiles_every_bucket_and_equals_eager():
    """FILO_CUDA_GRAPHS on the CPU: the same compiled, bucketed encoder (inductor records graphs only for
    CUDA tensors), warmed at every bucket, equal to eager for batch sizes between the buckets."""
    eager = build_random_engine("tiny", "cpu", grounding=False)
    graphed = eager.with_options(cuda_graphs=True, max_batch_size=4)
    assert isinstance(graphed.encoder, BucketedEncoder) and graphed.warmup_buckets == (1, 2, 4)
    graphed.warmup()
    for n in (3, 2):
        reqs = _mixed_requests(n)
        _assert_same_results(eager.inspect_batch(reqs), graphed.inspect_batch(reqs), 1e-4, 1e-5)


def test_pinned_copy_option_changes_no_value():
    engine = build_random_engine("tiny", "cpu", grounding=False)
    reqs = [InspectRequest(synthetic_image(200, 260, seed=4), "bottle", grounding=False)]
    assert engine.pin_memory
    (a,) = engine.inspect_batch(reqs)
    (b,) = engine.with_options(pin_memory=False).inspect_batch(reqs)
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    host = torch.ones(2, 3)
    assert engine._to_device(host) is host or torch.equal(engine._to_device(host), host)  # CPU: a plain .to()


def test_grounding_text_cache_setting_reaches_the_detector_and_changes_no_value(tmp_path):
    """FILO_GROUNDING_TEXT_CACHE: settings -> engine -> detector; the served results are the plain path's
    (the bit-for-bit comparison of logits and boxes is tests/test_grounding.py's)."""
    from service.engine.pipeline import GROUNDING_TEXT_CACHE_CAPTIONS, InspectionEngine
    from tests.service_fixtures import demo_settings

    assert FiloSettings.model_fields["grounding_text_cache"].default is False
    plain = InspectionEngine.from_settings(demo_settings(state_dir=tmp_path / "a", grounding=True, device="cpu"))
    cached = InspectionEngine.from_settings(demo_settings(state_dir=tmp_path / "b", grounding=True, device="cpu",
                                                          grounding_text_cache=True))
    assert plain.detector.text_cache is None
    assert cached.detector.text_cache is not None and cached.detector.text_cache.size == GROUNDING_TEXT_CACHE_CAPTIONS
    reqs = [InspectRequest(synthetic_image(120, 160, seed=s), c, grounding=True) for s, c in ((1, "bottle"), (2, "bottle"))]
    for _ in range(2):  # the second round is served from the cache
        for a, b in zip(plain.inspect_batch(reqs), cached.inspect_batch(reqs), strict=True):
            assert isinstance(a, InspectResult) and isinstance(b, InspectResult)
            np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
            assert a.boxes and (a.score, a.position, a.boxes) == (b.score, b.position, b.boxes)
    assert cached.detector.text_cache.hits >= 1


def test_bench_refuses_to_time_failing_batches():
    """A benchmark of the error path is a lie (the first GPU run timed one: every request failed fast)."""
    engine = build_random_engine("tiny", "cpu", grounding=False)
    with pytest.raises(RuntimeError, match="failed on 1 of 1 images"):
        time_batches(engine, 1, iters=1, warmup=1, category="no-such-category")


def test_prompt_tokens_follow_the_embedding_to_its_device():
    """The tokenizer makes host tensors; an embedding elsewhere (a GPU; here PyTorch's meta device) must
    receive them there (the first GPU run failed on this in every request)."""
    from models.clip_backbone import TINY_CLIP_MODEL, get_tokenizer
    from models.prompts import build_prompt_bank

    embed = torch.nn.Embedding(49408, 64).to("meta")
    bank = build_prompt_bank("bottle", ["crack", "scratch"], get_tokenizer(TINY_CLIP_MODEL), embed, n_ctx=12)
    assert bank.normal_prefix.device.type == "meta" and bank.abnormal_eot.device.type == "meta"


# --- the GPU image path's wiring, on CPU tensors --------------------------------------------------------------


def _force_device_path(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """`uses_device_path` is true only on CUDA; forcing it runs the same code on CPU tensors."""
    monkeypatch.setattr(f"{module}.uses_device_path", lambda enabled, device: bool(enabled))


def _served(settings, image: bytes) -> dict[str, dict]:
    """{grounding: response body} for one JPEG, and the truncated JPEG's refusal checked."""
    from service.api.app import create_app
    from service.backends.embedded import EmbeddedBackend
    from tests.service_fixtures import ServerThread, wait_ready

    bodies = {}
    with ServerThread(create_app(settings, EmbeddedBackend(settings))) as srv:
        wait_ready(srv.url)
        for grounding in ("false", "true"):
            r = httpx.post(f"{srv.url}/v1/inspect", data={"category": "bottle", "grounding": grounding,
                                                          "heatmap": "jpeg", "heatmap_size": "300"},
                           files={"image": ("x.jpg", image, "image/jpeg")}, timeout=60)
            assert r.status_code == 200, r.text
            bodies[grounding] = r.json()
        bad = httpx.post(f"{srv.url}/v1/inspect", data={"category": "bottle"},
                         files={"image": ("x.jpg", image[: len(image) // 2], "image/jpeg")}, timeout=60)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "truncated_image", bad.text
    return bodies


def test_embedded_server_with_the_gpu_image_path_matches_the_cpu_path(monkeypatch, tmp_path):
    """The stated deviation (docs/gpu.md): one grey level per resized pixel moves the demo model's
    score by under 1e-5 without Grounding DINO; with it, the detector's own input moves too, and a box near
    the two-decimal confidence ranking can pick another box: 4.7e-3 on this image, position top left -> all nine."""
    import base64

    from tests.service_fixtures import demo_settings

    image = _jpeg(300, 400, seed=5)
    # the demo's own frame (518) and its trained heads: the whole production path
    plain = _served(demo_settings(state_dir=tmp_path / "a", grounding=True, image_size=518), image)
    _force_device_path(monkeypatch, "service.engine.serving")
    device = _served(demo_settings(state_dir=tmp_path / "b", grounding=True, image_size=518, gpu_image_path=True),
                     image)
    assert abs(device["false"]["score"] - plain["false"]["score"]) < 1e-5
    assert abs(device["true"]["score"] - plain["true"]["score"]) < 1e-2
    # the detector's input moves by a grey level too: with random weights, boxes and phrases near its
    # thresholds (0.25) come and go, and the released rule ranks confidences cut to two decimals
    assert plain["true"]["boxes"] and device["true"]["boxes"]
    for body in (*plain.values(), *device.values()):
        assert body["heatmap"]["media_type"] == "image/jpeg" and body["heatmap"]["width"] == 300
        assert Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["base64"]))).size == (300, 225)


@pytest.mark.redis
def test_worker_with_the_gpu_image_path_answers_like_the_cpu_path(monkeypatch, redis_url):  # noqa: F811
    """One batched decode for the whole batch, PNG and a truncated JPEG handled on the CPU side."""
    from service.queue.protocol import Job
    from tests.service_fixtures import demo_settings, png_bytes
    from tests.test_worker_pipeline import running_worker

    _force_device_path(monkeypatch, "service.engine.serving")
    jpeg = _jpeg(240, 320, seed=6)
    uploads = {"jpeg": jpeg, "png": png_bytes(200, 240, seed=7), "cut": jpeg[: len(jpeg) // 2]}

    async def run(gpu_path: bool) -> dict:
        settings = demo_settings(redis_url=redis_url, max_batch_size=3, max_wait_ms=300, gpu_image_path=gpu_path,
                                 stream=f"filo:gpu-path-{gpu_path}")
        async with running_worker(settings, f"w-{gpu_path}", batch_s=0.0) as (_, _, producer):
            for name, data in uploads.items():
                job = Job(f"{name}-{gpu_path}", "bottle", data, 60_000, 3, heatmap={"format": "jpeg", "size": 200})
                assert (await producer.enqueue(job))[0] == "enqueued"
            return {name: await producer.wait_reply(f"{name}-{gpu_path}", 60) for name in uploads}

    plain, device = asyncio.run(run(False)), asyncio.run(run(True))
    for replies in (plain, device):
        assert replies["cut"].error is not None and replies["cut"].error["code"] == "truncated_image"
        assert replies["jpeg"].error is None and replies["png"].error is None
        assert replies["jpeg"].heatmap is not None and replies["jpeg"].heatmap.media_type == "image/jpeg"
        assert (replies["jpeg"].heatmap.width, replies["jpeg"].heatmap.height) == (200, 150)
    assert abs(device["jpeg"].result["score"] - plain["jpeg"].result["score"]) < 1e-3
    assert device["png"].result["score"] == plain["png"].result["score"]  # PNG: the CPU path both times


from tests.service_fixtures import redis_server, redis_url  # noqa: E402, F401  (fixtures)
