"""Model-only throughput of the inspection pipeline: images/s per batch size, precision and device.

Weights are random (the real ones cannot be fetched everywhere, and the network's cost does not depend on
its values); the architectures are the real ones with `arch="real"` (ViT-L/14@336 at 518 and
Grounding DINO tiny) or the tiny test models with `arch="tiny"`. Grounding DINO's stand-in is the realistic
one by default (a handful of boxes per image, as trained weights keep: filo_lab/standin.py), or the
worst case (`grounding_weights="worst-case"`: most of its 900 queries pass the box threshold, and the host
post-processes hundreds of boxes per image). Decoding and PNG encoding are excluded: this measures what a
GPU worker spends per batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from descriptions import CategoryCatalog
from models.clip_backbone import TINY_CLIP_MODEL
from models.constants import DEFAULT_CLIP_MODEL
from models.factory import ModelSpec, build_model
from service.core.types import InspectRequest, InspectResult
from service.engine.pipeline import EngineOptions, InspectionEngine


@dataclass
class BenchRow:
    device: str
    precision: str
    grounding: bool
    batch_size: int
    images_per_s: float
    ms_per_batch: float
    peak_gib: float | None = None  # CUDA only: the most memory the batch size needed (sizes FILO_MAX_BATCH_SIZE)
    compiled: bool = False  # torch.compile of the image encoder (FILO_COMPILE)
    pinned: bool = True  # pinned staging + non-blocking copy of the pixels (FILO_PIN_MEMORY)
    text_cache: bool = False  # Grounding DINO's text pass kept per caption (FILO_GROUNDING_TEXT_CACHE)
    deformable_attention: str = "off"  # what Grounding DINO's deformable attention ran (triton/hub/pytorch/off)
    grounding_compiled: bool = False  # Grounding DINO compiled as a whole (FILO_COMPILE_GROUNDING)
    grounding_weights: str = "realistic"  # the stand-in's kind (filo_lab/standin.py GROUNDING_KINDS)


def build_random_engine(arch: str, device: str, grounding: bool, seed: int = 0, text_cache: int = 0,
                        grounding_weights: str = "realistic", deformable_attention: str = "auto",
                        compile_grounding: bool = False) -> InspectionEngine:
    """An engine of the chosen architecture with random weights (labelled as such in model_info); Grounding
    DINO's stand-in of the kind `grounding_weights`, its deformable attention chosen by `deformable_attention`
    for `device` (models/grounding/deformable_attention.py)."""
    clip_name = DEFAULT_CLIP_MODEL if arch == "real" else TINY_CLIP_MODEL
    spec = ModelSpec(clip_model=clip_name, clip_weights=None, checkpoint=None, demo=True, seed=seed)
    model, info = build_model(spec, device=device)
    detector = None
    if grounding:
        from filo_lab.standin import grounding_model
        from models.grounding.detector import GroundingDetector, load_tiny_tokenizer, make_image_processor

        # real: grounding-dino-tiny's shape; tiny: the test configuration (and its seed's weights)
        detector = GroundingDetector(grounding_model(seed, arch, grounding_weights), make_image_processor(),
                                     load_tiny_tokenizer(), device=device, max_batch=64, text_cache=text_cache,
                                     deformable_attention=deformable_attention)
        info["grounding_weights"] = grounding_weights
    info.update(version=f"random-{arch}", profile="bench")
    return InspectionEngine(model, info, CategoryCatalog.load(), device, detector, grounding,
                            EngineOptions(compile_grounding=compile_grounding))


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (518, 518, 3), dtype=np.uint8) for _ in range(n)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_batches(engine: InspectionEngine, batch_size: int, iters: int, warmup: int,
                 category: str = "pcb1") -> tuple[float, float, float | None]:
    """(images/s, ms per batch) over `iters` timed batches after `warmup` untimed ones, and the peak
    CUDA memory of those batches in GiB (None off CUDA)."""
    # prepared once, as a worker hands them over (it resizes in other threads while a batch runs)
    reqs = [engine.prepare(InspectRequest(image=im, category=category)) for im in _images(batch_size)]
    cuda = str(engine.device).startswith("cuda")
    for _ in range(warmup):
        failed = [r for r in engine.inspect_batch(reqs) if not isinstance(r, InspectResult)]
        if failed:  # a benchmark of the error path would be a lie
            raise RuntimeError(f"the pipeline failed on {len(failed)} of {len(reqs)} images: {failed[0]!r}")
    _sync(engine.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        engine.inspect_batch(reqs)
    _sync(engine.device)
    dt = (time.perf_counter() - t0) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return batch_size / dt, dt * 1e3, peak


def bf16_map_deviation(engine: InspectionEngine, batch_size: int = 2, category: str = "pcb1") -> float:
    """Largest absolute difference of the final maps between bf16 autocast and fp32."""
    reqs = [InspectRequest(image=im, category=category) for im in _images(batch_size, seed=1)]
    ref = engine.with_options(precision="fp32").inspect_batch(reqs)
    low = engine.with_options(precision="bf16").inspect_batch(reqs)
    return max(float(np.abs(a.anomaly_map - b.anomaly_map).max()) for a, b in zip(ref, low))


def run_bench(arch: str, device: str, batch_sizes: list[int], precisions: list[str], groundings: list[bool],
              iters: int, warmup: int, compile: bool = False, pin_memory: bool = True,
              cuda_graphs: bool = False, text_cache: int = 0, grounding_weights: str = "realistic",
              deformable_attention: str = "auto", compile_grounding: bool = False) -> Iterator[BenchRow]:
    for grounding in groundings:
        base = build_random_engine(arch, device, grounding, text_cache=text_cache,
                                   grounding_weights=grounding_weights, deformable_attention=deformable_attention)
        for precision in precisions:
            # CUDA graphs: buckets up to the largest batch measured, recorded before timing (the service
            # records them at warm-up too)
            engine = base.with_options(precision=precision, pin_memory=pin_memory, compile=compile,
                                       cuda_graphs=cuda_graphs, max_batch_size=max(batch_sizes),
                                       compile_grounding=compile_grounding and grounding)
            if cuda_graphs:
                engine.warmup()
            runtime = engine.runtime()
            for bs in batch_sizes:
                ips, ms, peak = time_batches(engine, bs, iters, warmup)
                yield BenchRow(device, precision, grounding, bs, ips, ms, peak, compile or cuda_graphs, pin_memory,
                               text_cache > 0 and grounding, runtime["deformable_attention"],
                               runtime["grounding"].startswith("compiled"), grounding_weights if grounding else "-")
            del engine
        del base
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def flops_per_image(engine: InspectionEngine, grounding: bool, category: str = "pcb1") -> dict[str, float]:
    """GFLOP per image by part of the pipeline (PyTorch's FLOP counter, one image, fp32).

    With the sustained FLOP/s of a device this bounds the achievable images/s, which tells a GPU
    run whether its throughput is compute-bound or lost to overheads.
    """
    from torch.utils.flop_counter import FlopCounterMode

    req = InspectRequest(image=_images(1)[0], category=category, grounding=grounding)
    with FlopCounterMode(display=False) as counter:
        engine.with_options(precision="fp32").inspect_batch([req])
    by_module = {name: sum(ops.values()) / 1e9 for name, ops in counter.get_flop_counts().items()}
    total = counter.get_total_flops() / 1e9
    parts = {
        "image encoder (dual path)": by_module.get("FiLoModel.encoder", 0.0),
        "MMCI convolutions": by_module.get("FiLoModel.heads.decoder_cov", 0.0),
        "linear heads": by_module.get("FiLoModel.heads.decoder_linear", 0.0),
        "Grounding DINO": by_module.get("GroundingDinoForObjectDetection", 0.0),
    }
    parts["text encoder, maps, rest"] = total - sum(parts.values())
    parts["total"] = total
    return parts


def profile_batch(engine: InspectionEngine, batch_size: int, category: str = "pcb1", top: int = 15) -> dict:
    """Where one batch's time goes: torch.profiler over one prepared batch (after a warm one).

    Returns the batch's wall time, the summed self time of the device's kernels (on CUDA; their ratio is
    how busy the GPU was) and the `top` operators by self device time (CPU time off CUDA).
    """
    from torch.profiler import ProfilerActivity, profile

    reqs = [engine.prepare(InspectRequest(image=im, category=category)) for im in _images(batch_size)]
    cuda = str(engine.device).startswith("cuda")
    engine.inspect_batch(reqs)
    _sync(engine.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        engine.inspect_batch(reqs)
        _sync(engine.device)
        wall_ms = (time.perf_counter() - t0) * 1e3

    def self_ms(e) -> float:
        us = getattr(e, "self_device_time_total", None) if cuda else e.self_cpu_time_total
        return (us if us is not None else getattr(e, "self_cuda_time_total", 0.0)) / 1e3

    events = sorted(prof.key_averages(), key=self_ms, reverse=True)
    busy = sum(self_ms(e) for e in events) if cuda else None
    return {"batch_size": batch_size, "precision": engine.precision, "wall_ms": wall_ms,
            "device_busy_ms": busy,
            "top": [{"name": e.key, "calls": e.count, "self_ms": self_ms(e)} for e in events[:top]]}
