"""The GPU path, checked against the plain CPU path: `pytest -m cuda` (scripts/gpu_check.sh runs it first).

Every test here needs a CUDA device and is skipped with that reason where none is present (CI has none);
the CPU-side halves of the same claims (compile, pinned copies, batches) are tested in the ordinary suite.
fp32 comparisons run with TF32 off, so CPU and GPU differ by float rounding alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from filo_lab.bench.model import build_random_engine
from service.core.types import InspectRequest, InspectResult
from service.engine.pipeline import InspectionEngine
from tests.conftest import synthetic_image

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]

MAP_ATOL_FP32 = 1e-4  # CPU fp32 vs CUDA fp32, every map pixel
SCORE_ATOL_FP32 = 1e-5
# bf16 autocast vs fp32 on CUDA, real architectures with random weights: docs/gpu.md states these bounds
BF16_MAP_ATOL = 2e-2
BF16_SCORE_ATOL = 2e-2
# Peak CUDA memory (GiB) allowed per batch size, bf16, Grounding DINO on, real architectures: the budget
# docs/gpu.md gives for choosing FILO_MAX_BATCH_SIZE (weights plus a per-image share)
MEMORY_BASE_GIB = 6.0
MEMORY_PER_IMAGE_GIB = 0.5


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for matmuls and convolutions: the GPU then computes in the same precision as the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _requests(size: int) -> list[InspectRequest]:
    """Mixed categories, sizes and positions; given boxes exercise suppression without detector ties."""
    return [
        InspectRequest(synthetic_image(240, 320, seed=1), "bottle", grounding=False, position="top left"),
        InspectRequest(synthetic_image(300, 300, seed=2), "pcb1", boxes_frame=[(40.0, 50.0, 200.0, 220.0)]),
        InspectRequest(synthetic_image(size, 400, seed=3), "candle", grounding=False),
    ]


def _results(engine: InspectionEngine, reqs: list[InspectRequest]) -> list[InspectResult]:
    out = engine.inspect_batch(reqs)
    assert all(isinstance(r, InspectResult) for r in out), out
    return out  # type: ignore[return-value]


def _assert_close(a: list[InspectResult], b: list[InspectResult], map_atol: float, score_atol: float) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.position == y.position
        assert np.abs(x.anomaly_map - y.anomaly_map).max() <= map_atol
        assert abs(x.score - y.score) <= score_atol
        assert [t.description for t in x.top_types[:3]] == [t.description for t in y.top_types[:3]]


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[InspectionEngine, InspectionEngine]:
    return build_random_engine("tiny", "cpu", grounding=True), build_random_engine("tiny", "cuda", grounding=True)


@pytest.fixture(scope="module")
def real_pair() -> tuple[InspectionEngine, InspectionEngine]:
    torch.set_num_threads(os.cpu_count() or 1)  # the CPU reference of ViT-L (conftest keeps 2 for CI's machine)
    return build_random_engine("real", "cpu", grounding=True), build_random_engine("real", "cuda", grounding=True)


def test_tiny_pipeline_on_cuda_fp32_equals_cpu(tiny_pair):
    cpu, gpu = tiny_pair
    with exact_fp32():
        _assert_close(_results(cpu, _requests(518)), _results(gpu, _requests(518)), MAP_ATOL_FP32, SCORE_ATOL_FP32)


def test_real_architectures_on_cuda_fp32_equal_cpu(real_pair):
    """ViT-L/14@336 at 518 and the full FiLo heads, random weights."""
    cpu, gpu = real_pair
    with exact_fp32():
        _assert_close(_results(cpu, _requests(518)), _results(gpu, _requests(518)), MAP_ATOL_FP32, SCORE_ATOL_FP32)


@pytest.mark.parametrize("arch", ["tiny", "real"])
def test_grounding_dino_on_cuda_equals_cpu(arch, tiny_pair, real_pair):
    """The detector's raw outputs (token probabilities, boxes): random weights put queries near the box
    threshold, so the comparison is of the outputs themselves rather than of the kept boxes."""
    from models.grounding.hqloc import build_caption

    cpu, gpu = tiny_pair if arch == "tiny" else real_pair
    image = synthetic_image(300, 420, seed=9)
    caption = cpu.detector.encode_caption(build_caption(["scratch", "crack"]))
    pixels = cpu.detector.preprocess(image)
    with exact_fp32():
        p_cpu, b_cpu = cpu.detector.forward_batch(pixels, caption)
        p_gpu, b_gpu = gpu.detector.forward_batch(pixels, caption)
    assert (p_cpu - p_gpu).abs().max() <= 1e-4
    assert (b_cpu - b_gpu).abs().max() <= 1e-4


@pytest.mark.parametrize("bf16", [False, True])
def test_grounding_text_cache_on_cuda(bf16):
    """FILO_GROUNDING_TEXT_CACHE on CUDA: the kept one-row text pass, expanded, against the plain model's
    B-row pass, for a first call, a repeated call and other batch sizes. Bit-identical on the CPU
    (tests/test_grounding.py); here cuBLAS may pick other kernels for other row counts. If this fails, the
    setting must stay off by default (docs/gpu.md, "Speed options")."""
    from models.grounding.detector import GroundingDetector
    from models.grounding.hqloc import build_caption

    plain, cached = GroundingDetector.tiny(device="cuda"), GroundingDetector.tiny(device="cuda", text_cache=4)
    caption = plain.encode_caption(build_caption(["scratch", "crack"]))
    pixels = torch.cat([plain.preprocess(synthetic_image(300, 420, seed=s)) for s in range(8)])
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        for batch in (4, 4, 1, 8):
            want = plain.forward_batch(pixels[:batch], caption)
            got = cached.forward_batch(pixels[:batch], caption)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"batch {batch}"
    assert (cached.text_cache.misses, cached.text_cache.hits) == (1, 3)


# ----- Grounding DINO's deformable attention (the project's Triton kernel) and the compiled detector ---------------


def test_the_detector_moved_to_cuda_runs_the_triton_kernel(real_pair):
    """Loaded on the CPU, moved to CUDA: the layers take the kernel for the device they run on, the engine
    reports it, and the production rule lets it start."""
    from service.engine.runtime import check_runtime

    _, gpu = real_pair
    assert gpu.detector.deformable_attention == "triton"
    runtime = gpu.runtime()
    assert runtime["deformable_attention"] == "triton" and runtime["device"].startswith("cuda")
    assert check_runtime(runtime, "production", False) == []


@pytest.mark.parametrize("queries", ["decoder", "encoder"])
def test_triton_kernel_on_cuda_equals_the_pytorch_path(queries):
    """Grounding DINO tiny's shapes at the service's input: fp32 within 1e-5 of the PyTorch path on CUDA and of
    the exact answer; bf16 value with fp32 locations and weights (autocast's) within 1e-5 of the exact answer;
    all-bf16 within one bf16 rounding of the exact answer."""
    from models.grounding.deformable_attention_triton import custom_op
    from tests.test_deformable_attention import (
        BF16_UNIT,
        DECODER_QUERIES,
        FP32_ATOL,
        REAL_SHAPES,
        _exact,
        _inputs,
        _reference,
    )

    count = DECODER_QUERIES if queries == "decoder" else sum(h * w for h, w in REAL_SHAPES)
    for batch in (1, 3):
        cpu_args = _inputs(batch, count, REAL_SHAPES, seed=batch)
        args = [a.cuda() for a in cpu_args]
        op = custom_op()
        exact = _exact(*cpu_args)
        got = op(*args)
        with exact_fp32():
            want = _reference(*args)
        assert (got - want).abs().max() <= FP32_ATOL and (got.cpu().double() - exact).abs().max() <= FP32_ATOL
        value = args[0].bfloat16()
        got = op(value, *args[1:])
        assert got.dtype == torch.float32
        assert (got.cpu().double() - _exact(value.cpu(), *cpu_args[1:])).abs().max() <= FP32_ATOL
        low = [value, args[1], args[2], args[3].bfloat16(), args[4].bfloat16()]
        got = op(*low)
        exact = _exact(*[a.cpu() for a in low])
        assert got.dtype == torch.bfloat16
        assert ((got.cpu().double() - exact).abs() <= BF16_UNIT * exact.abs() + 1e-6).all()


def test_triton_kernel_on_cuda_awkward_shapes():
    from models.grounding.deformable_attention_triton import custom_op
    from tests.test_deformable_attention import AWKWARD_SHAPES, FP32_ATOL, _exact, _inputs

    for batch in (1, 3, 33):
        cpu_args = _inputs(batch, 11, AWKWARD_SHAPES, seed=batch, spread=0.3)
        got = custom_op()(*[a.cuda() for a in cpu_args])
        assert (got.cpu().double() - _exact(*cpu_args)).abs().max() <= FP32_ATOL


@pytest.mark.parametrize("bf16", [False, True])
def test_the_tiny_detector_with_the_kernel_equals_the_pytorch_path_on_cuda(bf16):
    from models.grounding.detector import GroundingDetector
    from models.grounding.hqloc import build_caption

    kernel = GroundingDetector.tiny(device="cuda")
    plain = GroundingDetector.tiny(device="cuda", deformable_attention="pytorch")
    assert (kernel.deformable_attention, plain.deformable_attention) == ("triton", "pytorch")
    caption = kernel.encode_caption(build_caption(["scratch", "crack"]))
    pixels = torch.cat([kernel.preprocess(synthetic_image(300, 420, seed=s)) for s in range(3)])
    with exact_fp32(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        (p_k, b_k), (p_p, b_p) = kernel.forward_batch(pixels, caption), plain.forward_batch(pixels, caption)
    atol = 2e-2 if bf16 else 1e-4
    assert (p_k - p_p).abs().max() <= atol and (b_k - b_p).abs().max() <= atol


@pytest.mark.parametrize("bf16", [False, True])
def test_the_compiled_detector_on_cuda_equals_eager(bf16):
    """FILO_COMPILE_GROUNDING on CUDA: inductor, the Triton kernel inside the graph (one graph, no break)."""
    from models.grounding.detector import COMPILE_CONFIG, GroundingDetector
    from models.grounding.hqloc import build_caption

    eager = GroundingDetector.tiny(device="cuda")
    compiled = eager.compiled_view()
    caption = eager.encode_caption(build_caption(["scratch", "crack"]))
    pixels = torch.cat([eager.preprocess(synthetic_image(300, 420, seed=s)) for s in range(2)])
    inputs = dict(pixel_values=pixels.cuda(), input_ids=caption.input_ids.expand(2, -1).cuda(),
                  attention_mask=caption.attention_mask.expand(2, -1).cuda(),
                  token_type_ids=caption.token_type_ids.expand(2, -1).cuda())
    with torch.no_grad(), torch._dynamo.config.patch(**COMPILE_CONFIG):
        explained = torch._dynamo.explain(eager.model)(**inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    with exact_fp32(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        (p_e, b_e), (p_c, b_c) = eager.forward_batch(pixels, caption), compiled.forward_batch(pixels, caption)
    atol = 2e-2 if bf16 else 1e-4
    assert (p_e - p_c).abs().max() <= atol and (b_e - b_c).abs().max() <= atol


def test_bf16_on_cuda_within_the_stated_bound(real_pair):
    _, gpu = real_pair
    reqs = _requests(518)
    with exact_fp32():
        full = _results(gpu, reqs)
    low = _results(gpu.with_options(precision="bf16"), reqs)
    for a, b in zip(full, low, strict=True):
        assert np.isfinite(b.anomaly_map).all()
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= BF16_MAP_ATOL
        assert abs(a.score - b.score) <= BF16_SCORE_ATOL


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mixed_batch_equals_one_by_one_on_cuda(real_pair, precision):
    _, gpu = real_pair
    reqs = _requests(518)
    engine = gpu.with_options(precision=precision)
    batch = _results(engine, reqs)
    single = [_results(engine, [r])[0] for r in reqs]
    # batched kernels choose other tilings than batch 1: float rounding, amplified by bf16's 8 bits
    _assert_close(batch, single, 1e-4 if precision == "fp32" else BF16_MAP_ATOL,
                  1e-5 if precision == "fp32" else BF16_SCORE_ATOL)


def test_references_on_cuda_equal_cpu(tiny_pair):
    from tests.test_references_service import _refs

    cpu, gpu = tiny_pair
    for engine in (cpu, gpu):
        engine.references.set("bottle", _refs())
    try:
        reqs = [InspectRequest(synthetic_image(240, 320, seed=s), "bottle", grounding=False) for s in (1, 2)]
        with exact_fp32():
            a, b = _results(cpu, reqs), _results(gpu, reqs)
        assert [r.references for r in b] == [3, 3]
        # the reference memory is fp16 on both devices; matching sums differ in order only
        _assert_close(a, b, 1e-3, 1e-4)
    finally:
        for engine in (cpu, gpu):
            engine.references.clear("bottle")


def test_no_host_synchronisation_inside_the_batched_forward(real_pair):
    """The forward queues its kernels without waiting for the GPU: no .item(), no host-built tensors
    copied over, no data-dependent shapes. (The engine copies the results to the host once, after it.)"""
    _, gpu = real_pair
    reqs = [gpu.prepare(r) for r in _requests(518)]
    cats = [gpu.catalog.get(r.category) for r in reqs]
    banks = [gpu.model.prompt_bank(c.noun, c.descriptions) for c in cats]
    pixels = torch.stack([r.pixels for r in reqs]).pin_memory().to("cuda", non_blocking=True)
    for precision in ("fp32", "bf16"):
        model = gpu.with_options(precision=precision).model
        with torch.no_grad():
            model(pixels, banks, ["top left", None, "bottom"])  # warm: lazy initialisation may sync
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = model(pixels, banks, ["top left", None, "bottom"])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert out.anomaly_map.shape == (3, 518, 518)


def test_pinned_copies_change_nothing(tiny_pair):
    _, gpu = tiny_pair
    plain = _results(gpu.with_options(pin_memory=False), _requests(518))
    pinned = _results(gpu.with_options(pin_memory=True), _requests(518))
    for a, b in zip(plain, pinned, strict=True):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        assert a.score == b.score


def test_compiled_encoder_on_cuda_equals_eager():
    eager = build_random_engine("tiny", "cuda", grounding=False)
    compiled = eager.with_options(compile=True)
    reqs = _requests(518)
    with exact_fp32():
        _assert_close(_results(eager, reqs), _results(compiled, reqs), 1e-4, 1e-5)


def test_cuda_graphs_equal_eager_and_keep_each_batch_its_own_outputs():
    """FILO_CUDA_GRAPHS: graphed, bucketed encoder = eager; a later replay (another bucket, then the same
    one) must not overwrite the results an earlier batch already returned."""
    eager = build_random_engine("tiny", "cuda", grounding=False)
    graphed = eager.with_options(cuda_graphs=True, max_batch_size=4)
    graphed.warmup()
    with exact_fp32():
        first, second = _requests(518), _requests(300)[:2]
        got_first = _results(graphed, first)  # bucket 4, padded
        got_second = _results(graphed, second)  # bucket 2
        again = _results(graphed, first)  # bucket 4 again: replays over the first batch's buffers
        _assert_close(_results(eager, first), got_first, 1e-4, 1e-5)
        _assert_close(_results(eager, second), got_second, 1e-4, 1e-5)
        _assert_close(got_first, again, 1e-6, 1e-7)


@pytest.mark.parametrize("batch_size", [1, 8, 32])
def test_peak_memory_within_the_stated_budget(real_pair, batch_size):
    """docs/gpu.md: peak memory per batch size, bf16, Grounding DINO on, for FILO_MAX_BATCH_SIZE."""
    _, gpu = real_pair
    reqs = [gpu.prepare(InspectRequest(synthetic_image(480, 640, seed=i), "pcb1")) for i in range(batch_size)]
    bf16 = gpu.with_options(precision="bf16")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    _results(bf16, reqs)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"peak GiB at batch {batch_size}: {peak:.2f}")
    assert peak <= MEMORY_BASE_GIB + MEMORY_PER_IMAGE_GIB * batch_size


def test_worker_prepares_the_next_batch_while_one_runs_on_cuda(redis_url):  # noqa: F811
    """The worker's prepare/compute overlap, with the engine on the GPU."""
    from tests.service_fixtures import demo_settings
    from tests.test_worker_pipeline import check_next_batch_prepared_while_one_runs

    settings = demo_settings(redis_url=redis_url, max_batch_size=2, max_wait_ms=200, device="cuda")
    check_next_batch_prepared_while_one_runs(settings, "cuda-pipelined")


from tests.service_fixtures import redis_server, redis_url  # noqa: E402, F401  (fixtures of the last test)
