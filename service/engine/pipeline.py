"""The inspection pipeline: decoded images in, FiLo results out, one batch at a time.

Order of work per batch (spec section 6): Grounding DINO on the original images decides each
image's position and boxes -> FiLo runs once for the whole batch (mixed categories allowed) ->
box suppression and the image score per image. A request that fails (unknown category, a crash
on its image) comes back as an `InspectError` in its own slot; its neighbours are unaffected.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from descriptions import Category, CategoryCatalog, UnknownCategoryError
from models import anomaly_maps as am
from models.clip_backbone import make_preprocess
from models.factory import ModelSpec, build_model, demo_spec
from models.filo import FiLoModel
from models.frame import FrameGeometry
from models.prompts import POSITIONS, PromptBank
from service.core.keys import prompt_bank_key
from service.core.types import AnomalyType, Box, InspectError, InspectRequest, InspectResult
from service.engine import gpu_imaging
from service.engine.buckets import BucketedEncoder, bucket_sizes
from service.engine.references import EngineReferences
from service.engine.runtime import check_runtime, describe
from service.settings import FiloSettings

if TYPE_CHECKING:
    from models.grounding.hqloc import Detection

log = logging.getLogger(__name__)

# FILO_GROUNDING_TEXT_CACHE: captions whose BERT pass is kept (one per category in use; a few KB to a few MB each)
GROUNDING_TEXT_CACHE_CAPTIONS = 16


@dataclass
class _Localisation:
    position: str | None
    keep: torch.Tensor | None  # (S, S) bool, None: no suppression
    boxes: list[Box]


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs, fixed when it is built: nothing changes it between batches.

    `precision`: "bf16" autocasts the frozen encoders, the heads and Grounding DINO (maps stay fp32).
    `compile`: torch.compile the image encoder, the bulk of the FLOPs (880 of 1505 GFLOP per image); the text
    side and the maps run per category and position with varying shapes, where recompiling would cost more than
    it saves. `cuda_graphs`: the compiled encoder also CUDA-graphed, its batches padded to bucket sizes up to
    `max_batch_size` (service/engine/buckets.py), each recorded once at warm-up. `pin_memory`: on CUDA, the
    batch's pixels staged in pinned memory and copied without blocking the host. `max_batch_size`: the largest
    batch the process runs (on CUDA the warm-up runs it, so allocator and kernel choice are settled before
    readiness). `compile_grounding`: torch.compile Grounding DINO as a whole (a compiled view of the detector;
    the detector itself is never modified).
    """

    precision: str = "fp32"
    compile: bool = False
    cuda_graphs: bool = False
    pin_memory: bool = True
    max_batch_size: int = 1
    compile_grounding: bool = False

    @classmethod
    def from_settings(cls, settings: FiloSettings) -> EngineOptions:
        return cls(settings.precision, settings.compile, settings.cuda_graphs, settings.pin_memory,
                   settings.max_batch_size, settings.compile_grounding)


class InspectionEngine:
    def __init__(self, model: FiLoModel, model_info: dict[str, Any], catalog: CategoryCatalog,
                 device: str, detector: Any | None = None, grounding_default: bool = True,
                 options: EngineOptions | None = None, settings: FiloSettings | None = None):
        self.model = model
        self.info = model_info
        self.catalog = catalog
        self.device = device
        self.options = options or EngineOptions()
        # the detector as given (other engines over the same weights start from it) and as this engine runs it
        self.base_detector = detector
        self.detector = detector.compiled_view() if detector is not None and self.options.compile_grounding \
            else detector
        self.grounding_default = grounding_default and detector is not None
        self.runtime_warnings: list[str] = []
        self.model.precision = self.options.precision  # the engine's model runs at the engine's precision
        self.image_size = model.image_size
        self.preprocess = make_preprocess(model.image_size)
        # the image encoder as this engine calls it: the model's own module, or a compiled (bucketed) wrapper of it;
        # the model is never modified
        self.encoder, self.warmup_buckets = _encoder_for(model, self.options)
        self._settings = settings
        # Resizing a camera image to the model frame costs ~13 ms of CPU (1024 px, bicubic); done one
        # after another it would cap a GPU worker near 75 images/s, so images are prepared in parallel
        # (PIL and torch release the GIL while they resize and normalise).
        self._prepare_pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                thread_name_prefix="filo-prepare")
        # few-shot normal references (service/engine/references.py): they see the model through one function;
        # configured once, from `settings` (the process's own; FiloSettings() where none is given)
        self.references = EngineReferences(self.info, self.catalog, self._encode_references, self.image_size,
                                           settings)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: FiloSettings) -> InspectionEngine:
        """Load everything a process needs (slow); production raises WeightsNotFoundError when weights are missing."""
        device = settings.resolved_device()
        catalog = CategoryCatalog.load(settings.descriptions)
        if settings.is_demo:
            spec = demo_spec(image_size=settings.image_size, tap_layout=settings.tap_layout,
                             checkpoint=settings.checkpoint, random_heads=settings.demo_heads == "random",
                             allow_activation_mismatch=settings.allow_activation_mismatch)
        else:
            spec = ModelSpec(clip_model=settings.clip_model, clip_weights=settings.clip_weights,
                             image_size=settings.image_size, checkpoint=settings.checkpoint,
                             tap_layout=settings.tap_layout,
                             allow_activation_mismatch=settings.allow_activation_mismatch)
        cache_dir = str(settings.cache_dir) if settings.cache_dir else None
        model, info = build_model(spec, device=device, cache_dir=cache_dir)
        detector = None
        if settings.grounding:
            from models.grounding.detector import GroundingDetector

            text_cache = GROUNDING_TEXT_CACHE_CAPTIONS if settings.grounding_text_cache else 0
            choice = settings.grounding_deformable_attention
            detector = (GroundingDetector.tiny(device=device, text_cache=text_cache, deformable_attention=choice)
                        if settings.is_demo
                        else GroundingDetector.from_pretrained(settings.grounding_model, device=device,
                                                               text_cache=text_cache, deformable_attention=choice,
                                                               local_files_only=settings.hub_offline))
            info["grounding_model"] = "tiny-random" if settings.is_demo else settings.grounding_model
            if detector.standin and not info.get("standin"):
                info.update(standin=True, version="standin-" + info["version"])
        engine = cls(model, info, catalog, device, detector, settings.grounding, EngineOptions.from_settings(settings),
                     settings)
        # no silent fallbacks: what runs is said once, and a production GPU refuses the slow deformable attention
        engine.runtime_warnings = check_runtime(engine.runtime(), settings.profile,
                                                settings.allow_pytorch_deformable_attention)
        for warning in engine.runtime_warnings:
            log.warning("%s", warning)
        log.info("engine runtime: %s", describe(engine.runtime()))
        return engine

    def with_options(self, **changes: Any) -> InspectionEngine:
        """Another engine over the same weights, detector and catalog, built with other options (benchmarks and
        tests compare them side by side); it starts without this one's references."""
        view = copy.copy(self.model)  # shares every parameter and submodule; its own precision
        return InspectionEngine(view, self.info, self.catalog, self.device, self.base_detector,
                                self.grounding_default, replace(self.options, **changes), self._settings)

    def runtime(self) -> dict[str, Any]:
        """What each expensive part runs (service/engine/runtime.py): for the start log, /readyz and
        filo_engine_info. Read from the parts themselves (the detector's layers on the device its model is on
        now), not from the settings that asked for them."""
        cuda = str(self.device).startswith("cuda")
        graphs = "on" if self.options.cuda_graphs and cuda else "off (needs CUDA)" if self.options.cuda_graphs \
            else "off"
        grounding = self.detector.runtime() if self.detector is not None else {}
        return {"device": str(self.device), "precision": self.precision,
                "encoder": "compiled" if self.compiled else "eager", "cuda_graphs": graphs,
                "grounding": grounding.get("grounding", "off"),
                "deformable_attention": grounding.get("deformable_attention", "off"),
                "warnings": list(self.runtime_warnings)}

    @property
    def precision(self) -> str:
        return self.options.precision

    @property
    def pin_memory(self) -> bool:
        return self.options.pin_memory

    @property
    def compiled(self) -> bool:
        return self.options.compile or self.options.cuda_graphs

    @property
    def warmup_batch_size(self) -> int:
        return warmup_batch_size(self.options, self.device)

    def model_info(self) -> dict[str, Any]:
        return dict(self.info)

    # --- categories and caches -----------------------------------------------------------------------
    def prepare_category(self, name: str) -> PromptBank:
        """Build (or fetch) the category's tokenised prompts; raises UnknownCategoryError."""
        category = self.catalog.get(name)
        return self.model.prompt_bank(category.noun, category.descriptions)

    def cache_state(self) -> dict[str, bytes]:
        """Every prepared category's prompt bank, serialised (safetensors) under its `prompt_bank_key`."""
        state = {}
        banks = self.model.cached_banks()
        for name in self.catalog.names():
            category = self.catalog.get(name)
            bank = banks.get((category.noun, tuple(category.descriptions)))
            if bank is not None:
                tensors = {k: v.detach().cpu().contiguous() for k, v in bank.as_tensors().items()}
                state[prompt_bank_key(self.info, category)] = st_save(tensors)
        return state

    def load_cache_state(self, state: dict[str, bytes]) -> int:
        """Install persisted prompt banks whose key matches a known category; returns how many banks."""
        loaded: set[str] = set()
        for name in self.catalog.names():
            category = self.catalog.get(name)
            key = prompt_bank_key(self.info, category)
            if key in state and key not in loaded:
                bank = PromptBank.from_tensors(st_load(state[key]))
                self.model.put_prompt_bank(category.noun, category.descriptions, bank)
                loaded.add(key)
        return len(loaded)

    def warmup(self) -> None:
        """One batch through every stage so the first real request pays no lazy initialisation.

        On CUDA the batch is `warmup_batch_size` images (the largest the process will run): the
        allocator grows and kernels are chosen for that shape before readiness, and a batch that
        does not fit in memory fails the start instead of requests.
        """
        name = self.catalog.names()[0]
        img = np.full((self.image_size, self.image_size, 3), 127, np.uint8)
        # CUDA graphs: every bucket is compiled and recorded now, largest first (the memory high mark)
        for size in sorted({max(1, self.warmup_batch_size), *self.warmup_buckets}, reverse=True):
            batch = [InspectRequest(image=img, category=name) for _ in range(size)]
            for result in self.inspect_batch(batch):
                if isinstance(result, InspectError):
                    raise RuntimeError(f"warm-up failed: {result.message}")

    # --- inspection -------------------------------------------------------------------------------------
    def prepare(self, request: InspectRequest) -> InspectRequest:
        """Attach the model input to a request: CPU work that is safe in any thread.

        A worker calls it for the next batch while the current one runs on the accelerator;
        `inspect_batch` prepares whatever arrives without it.
        """
        on_device = isinstance(request.image, torch.Tensor)  # decoded on the GPU (service/engine/device_images.py)
        if request.pixels is None:
            request.pixels = (gpu_imaging.clip_input(request.image, self.image_size) if on_device
                              else self.preprocess(Image.fromarray(request.image)))
        if request.grounding_pixels is None and self._will_detect(request):
            request.grounding_pixels = (gpu_imaging.grounding_input(request.image) if on_device
                                        else self.detector.preprocess(request.image))
        return request

    def _will_detect(self, request: InspectRequest) -> bool:
        return request.boxes_frame is None and self._grounding_on(request) and self.detector is not None

    def inspect_batch(self, requests: Sequence[InspectRequest]) -> list[InspectResult | InspectError]:
        results: list[InspectResult | InspectError | None] = [None] * len(requests)
        ok: list[int] = []
        categories: dict[int, Category] = {}
        for i, req in enumerate(requests):
            try:
                categories[i] = self._validate(req)
                ok.append(i)
            except InspectError as err:
                results[i] = err
        if ok:
            try:
                batch = self._run([requests[i] for i in ok], [categories[i] for i in ok])
            except Exception:  # one bad image must not fail its neighbours: retry each alone
                log.exception("batch of %d failed; retrying its requests one by one", len(ok))
                batch = [self._run_one_safely(requests[i], categories[i]) for i in ok]
            for i, res in zip(ok, batch, strict=True):
                results[i] = res
        return results  # type: ignore[return-value]

    def _run_one_safely(self, req: InspectRequest, category: Category) -> InspectResult | InspectError:
        try:
            return self._run([req], [category])[0]
        except Exception as exc:
            log.exception("inspection failed for one request")
            return InspectError("model_error", f"the model failed on this image: {type(exc).__name__}: {exc}", 500)

    def _validate(self, req: InspectRequest) -> Category:
        try:
            category = self.catalog.get(req.category)
        except UnknownCategoryError as exc:
            raise InspectError("unknown_category", str(exc), 404) from None
        if req.position is not None and req.position not in POSITIONS:
            raise InspectError("bad_parameter", f"position must be one of {', '.join(POSITIONS)}", 422)
        img = req.image
        if not ((isinstance(img, np.ndarray) and img.dtype == np.uint8)
                or (isinstance(img, torch.Tensor) and img.dtype == torch.uint8)) or img.ndim != 3 or img.shape[2] != 3:
            raise InspectError("bad_image", "image must be an HxWx3 uint8 RGB array (or tensor on the device)", 422)
        if req.pixels is not None and tuple(req.pixels.shape) != (3, self.image_size, self.image_size):
            raise InspectError("bad_image", f"prepared pixels must be 3x{self.image_size}x{self.image_size}", 422)
        if req.top_k < 1:
            raise InspectError("bad_parameter", "top_k must be at least 1", 422)
        if req.grounding and self.detector is None and req.boxes_frame is None:
            raise InspectError("grounding_unavailable", "Grounding DINO is not loaded in this process", 422)
        return category

    def _run(self, reqs: Sequence[InspectRequest], cats: Sequence[Category]) -> list[InspectResult]:
        t0 = time.perf_counter()
        reqs = list(self._prepare_pool.map(lambda r: self.prepare(replace(r)), reqs))  # callers' requests untouched
        pixels = self._to_device(torch.stack([r.pixels for r in reqs]))
        t1 = time.perf_counter()
        with torch.no_grad(), self._autocast():
            locs = self._localise(reqs, cats)
        t2 = time.perf_counter()
        banks = [self.model.prompt_bank(c.noun, c.descriptions) for c in cats]
        memories = self.references.memories_for(reqs, cats)  # None each: zero-shot, untouched below
        with torch.no_grad():
            out = self.model(pixels, banks, [loc.position for loc in locs], encoder=self.encoder)
        maps = self.references.fuse(out.anomaly_map.float(), out.stream, memories)
        t3 = time.perf_counter()
        timing = {"preprocess": (t1 - t0) * 1e3, "grounding": (t2 - t1) * 1e3, "model": (t3 - t2) * 1e3,
                  "batch_size": float(len(reqs))}
        # Everything for the whole batch on the device, then one copy to the host: per-image
        # `.item()`s and copies would each wait for the accelerator.
        map_max = maps.flatten(1).max(dim=1).values
        text_abnormal = out.text_probs[:, 1].float()
        scores = am.image_score(text_abnormal, map_max)
        finals = torch.stack([am.suppress(maps[i], None if loc.keep is None else loc.keep.to(maps.device))
                              for i, loc in enumerate(locs)])
        finals_np = finals.cpu().numpy().astype(np.float32, copy=False)
        map_max, text_abnormal, scores = map_max.cpu(), text_abnormal.cpu(), scores.cpu()
        all_sims = torch.cat(out.type_similarity).float().cpu().split([len(t) for t in out.type_similarity])
        results = []
        for i, (req, cat, loc) in enumerate(zip(reqs, cats, locs, strict=True)):
            sims = all_sims[i]
            order = torch.argsort(sims, descending=True)[: req.top_k].tolist()
            score = float(scores[i])
            rule = self.references.rule(cat.name, memories[i])
            verdict = rule.verdict(score)
            results.append(InspectResult(
                score=score,
                text_score=float(text_abnormal[i]),
                map_max=float(map_max[i]),
                anomaly_map=finals_np[i],
                position=loc.position,
                boxes=loc.boxes,
                top_types=[AnomalyType(cat.descriptions[j], float(sims[j])) for j in order],
                timing_ms=dict(timing),
                references=memories[i].n_images if memories[i] is not None else 0,
                threshold=rule.threshold,
                threshold_source=rule.source,
                review_margin=rule.review_margin,
                is_anomalous=verdict.is_anomalous,
                needs_review=verdict.needs_review,
            ))
        return results

    def _encode_references(self, images: Sequence[np.ndarray], category: Category) -> Any:
        """Normal reference images through FiLo, zero-shot and without Grounding DINO: what a memory is built of.

        Memories are built on a thread of their own while batches run on the engine's (service/catalog/
        references.py `plan_extras`), so this runs the model's own eager encoder, never the engine's compiled or
        CUDA-graphed one (whose recorded buffers belong to the batch thread); the two agree within float
        rounding (tests/test_speed_options.py)."""
        bank = self.model.prompt_bank(category.noun, category.descriptions)
        reqs = [self.prepare(InspectRequest(image=im, category=category.name, grounding=False)) for im in images]
        pixels = self._to_device(torch.stack([r.pixels for r in reqs]))
        with torch.no_grad():
            return self.model(pixels, [bank] * len(reqs), [None] * len(reqs))

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """The batch's pixels on the device; from pinned memory without blocking the host on CUDA (the
        copy is ordered on the stream before the forward, so nothing reads it early)."""
        if host.device.type == "cuda" or not str(self.device).startswith("cuda") or not self.pin_memory:
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def _autocast(self):
        """bf16 autocast for Grounding DINO (FiLo's own precision is set on the model)."""
        device_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # --- HQ-Loc -----------------------------------------------------------------------------------------
    def _localise(self, reqs: Sequence[InspectRequest], cats: Sequence[Category]) -> list[_Localisation]:
        from models.grounding import hqloc as gd

        locs: list[_Localisation | None] = [None] * len(reqs)
        to_detect = []
        size = self.image_size
        for i, req in enumerate(reqs):
            geo = FrameGeometry(req.image.shape[0], req.image.shape[1], size)
            if req.boxes_frame is not None:
                frame = np.asarray(req.boxes_frame, np.float64).reshape(-1, 4)
                # given boxes are all valid and equally confident: the released tie rule picks the last
                position = req.position or gd.choose_position(frame, np.ones(len(frame)), np.ones(len(frame), bool))
                keep = gd.suppression_keep_mask(frame, size, semantics="clamp")
                boxes = _boxes(frame, geo.boxes_to_original(frame), ["given"] * len(frame), [1.0] * len(frame),
                               [True] * len(frame))
                locs[i] = _Localisation(position, keep, boxes)
            elif self._will_detect(req):
                to_detect.append(i)
            else:
                locs[i] = _Localisation(req.position, None, [])
        if to_detect:
            detections = self.detector.detect([reqs[i].image for i in to_detect],
                                              [list(cats[i].descriptions) for i in to_detect],
                                              [reqs[i].grounding_pixels for i in to_detect])
            for i, dets in zip(to_detect, detections, strict=True):
                locs[i] = self._from_detections(reqs[i], dets)
        return locs  # type: ignore[return-value]

    def _grounding_on(self, req: InspectRequest) -> bool:
        return bool(self.grounding_default if req.grounding is None else req.grounding)

    def _from_detections(self, req: InspectRequest, dets: list) -> _Localisation:
        position, keep, boxes = localise_detections(dets, (int(req.image.shape[0]), int(req.image.shape[1])),
                                                    self.image_size)
        return _Localisation(req.position or position, keep, boxes)


def warmup_batch_size(options: EngineOptions, device: str) -> int:
    """The largest batch on CUDA (allocator and kernel choice are shape-dependent); 1 on CPU, where warming
    a big batch only delays readiness."""
    return options.max_batch_size if str(device).startswith("cuda") else 1


def _encoder_for(model: FiLoModel, options: EngineOptions) -> tuple[Any, tuple[int, ...]]:
    """The encoder an engine with `options` calls, and the batch sizes to record at warm-up (CUDA graphs)."""
    if options.cuda_graphs:
        compiled = torch.compile(model.encoder, mode="reduce-overhead", dynamic=False)
        buckets = bucket_sizes(options.max_batch_size)
        return BucketedEncoder(compiled, buckets, cuda_graphs=True), buckets
    if options.compile:
        return torch.compile(model.encoder), ()
    return model.encoder, ()


def localise_detections(dets: Sequence[Detection], image_hw: tuple[int, int], size: int
                        ) -> tuple[str, torch.Tensor, list[Box]]:
    """HQ-Loc over one image's detections: the released position, the suppression mask and the answer's boxes.

    The whole CPU cost of a detection result after the detector (`filo_lab.bench.grounding_post` times it
    with stand-in weights, which keep hundreds of boxes)."""
    from models.grounding import hqloc as gd

    position, frame, valid = gd.localise(dets, image_hw, size)
    keep = gd.suppression_keep_mask(frame[valid], size, semantics="released")
    frame_np = frame.numpy()
    orig = FrameGeometry(image_hw[0], image_hw[1], size).boxes_to_original(frame_np)
    boxes = _boxes(frame_np, orig, [d.phrase for d in dets], [d.confidence for d in dets], valid.tolist())
    return position, keep, boxes


def _boxes(frame_xyxy: np.ndarray, orig_xyxy: np.ndarray, phrases: Sequence[str], confidences: Sequence[float],
           valid: Sequence[bool]) -> list[Box]:
    """The answer's boxes from (n, 4) frame and original corners: one ``tolist`` per array rather than a
    float() per corner (stand-in weights keep hundreds of boxes per image)."""
    return [Box(*orig, phrase=phrase, confidence=float(conf), valid=bool(ok), frame=tuple(frame))
            for frame, orig, phrase, conf, ok in zip(np.asarray(frame_xyxy, np.float64).tolist(),
                                                     np.asarray(orig_xyxy, np.float64).tolist(),
                                                     phrases, confidences, valid, strict=True)]

