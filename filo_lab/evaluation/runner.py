"""Benchmark evaluation: a dataset's test split through the inspection engine, into the seven metrics.

`filo eval` is a thin command over `evaluate_dataset`; keeping the loop here (not in the CLI) lets
tests and notebooks evaluate a model held in memory, for instance one just trained.

The images go through exactly the code path the service uses (`InspectionEngine.inspect_batch`:
preprocessing, Grounding DINO when on, FiLo, box suppression, image score), so the figures describe
what a deployed model does. Maps come back in the model's S x S frame; the ground-truth masks are
brought into the same frame with the image's own resize + center crop and binarised at 0.5
(spec section 9). Categories are evaluated one at a time and their arrays dropped afterwards, so
memory holds one category's maps (VisA's largest category: about 200 maps of 518 x 518), not the
whole benchmark's.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from filo_lab.data import (
    DEFAULT_MASK_INTERPOLATION,
    MASK_INTERPOLATIONS,
    Sample,
    catalog_name,
    detect_layout,
    group_by_category,
    limit_per_category,
    load_sample,
    read_dataset,
    resize_crop_image,
    resize_crop_mask,
)
from filo_lab.evaluation.metrics import METRIC_KEYS, evaluate_with_curves
from filo_lab.evaluation.report import mean_metrics, slug, write_report

if TYPE_CHECKING:  # the engine is the one service object this module drives (see evaluate_dataset)
    from service.engine.pipeline import InspectionEngine

log = logging.getLogger(__name__)

EXAMPLES_PER_CATEGORY = 2
MAX_EXAMPLE_ROWS = 16


@dataclass
class CategoryArrays:
    """What the metrics of one category are computed from, all in the S x S model frame."""

    masks: np.ndarray | None  # (N, S, S) uint8 0/1; None when the ground truth is unknown
    maps: np.ndarray  # (N, S, S) float32, after box suppression (what the service returns)
    labels: np.ndarray  # (N,) int64 0/1
    scores: np.ndarray  # (N,) float64
    paths: list[str] = field(default_factory=list)


@dataclass
class EvalResult:
    per_category: dict[str, dict[str, float]]
    mean: dict[str, float]
    images: dict[str, int]
    failures: list[tuple[str, str]]  # (image path, message) of images the engine refused
    seconds: float
    report: dict[str, Any] | None = None  # paths written by `filo_lab.evaluation.report.write_report`
    arrays: dict[str, CategoryArrays] | None = None  # with keep_arrays
    shot_images: dict[str, list[str]] = field(default_factory=dict)  # k-shot: the normal references used

    def table(self) -> str:
        from filo_lab.evaluation.report import format_table

        return format_table(self.per_category)


def evaluate_dataset(
    engine: InspectionEngine,
    root: str | Path,
    *,
    layout: str = "auto",
    categories: list[str] | None = None,
    split: str = "test",
    batch_size: int = 8,
    max_images: int | None = None,
    grounding: bool = True,
    mask_interpolation: str = DEFAULT_MASK_INTERPOLATION,
    mask_geometry: str = "crop",
    out_dir: str | Path | None = None,
    examples_per_category: int = EXAMPLES_PER_CATEGORY,
    keep_arrays: bool = False,
    save_arrays: bool = False,
    progress: bool = True,
    shots: int = 0,
    shot_seed: int = 0,
) -> EvalResult:
    """Run `engine` over a dataset split and compute the metrics per category.

    The engine, not the bare model, is what is measured: benchmark figures then describe exactly what
    the service returns (grounding, suppression, score), at the price of this one upward dependency.

    With `out_dir`, writes the report (metrics.md/.csv/.json, roc/<category>.png, examples.png) and
    eval_info.json; with `save_arrays` also arrays/<category>.npz (masks, maps, labels, scores) so
    the metrics can be recomputed without the model. Every category must exist in the engine's
    catalog (checked before any image is read).
    """
    if mask_interpolation not in MASK_INTERPOLATIONS:
        raise ValueError(f"mask_interpolation must be one of {MASK_INTERPOLATIONS}, not {mask_interpolation!r}")
    out = Path(out_dir) if out_dir is not None else None
    if save_arrays and out is None:
        raise ValueError("save_arrays needs an out_dir")
    t0 = time.perf_counter()
    root = Path(root)
    todo = plan_categories(engine, root, layout=layout, categories=categories, split=split, batch_size=batch_size,
                           max_images=max_images, shots=shots, shot_seed=shot_seed)
    per_category, curves, examples, failures, kept, counts = _evaluate_groups(
        engine, todo, batch_size, grounding, (mask_interpolation, mask_geometry),
        examples_per_category, out if save_arrays else None, keep_arrays, progress)
    result = EvalResult(per_category, mean_metrics(per_category), counts, failures, time.perf_counter() - t0,
                        arrays=kept if keep_arrays else None, shot_images=todo.shots)
    if out is not None:
        result.report = write_report(out, per_category, curves, examples[:MAX_EXAMPLE_ROWS] or None)
        _write_info(out / "eval_info.json", engine, root, layout, split, grounding,
                    f"{mask_interpolation}/{mask_geometry}", max_images, result)
    return result


def _evaluate_groups(engine: InspectionEngine, todo: CategoryPlan, batch_size: int, grounding: bool,
                     mask_mode: tuple[str, str], n_examples: int, arrays_dir: Path | None, keep_arrays: bool,
                     progress: bool):
    """Each category in turn (with its k-shot references, if any): its arrays, metrics, curves, examples."""
    per_category: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    examples: list[dict] = []
    failures: list[tuple[str, str]] = []
    kept: dict[str, CategoryArrays] = {}
    counts: dict[str, int] = {}
    with tqdm(total=todo.images, desc="eval", unit="img", file=sys.stderr, disable=not progress) as bar:
        for cat, name, group in each_category(engine, todo):
            bar.set_postfix_str(cat)
            arrays, cat_examples, cat_failures = _run_category(
                engine, name, group, batch_size, grounding, mask_mode, n_examples, bar,
            )
            failures += cat_failures
            counts[cat] = len(arrays.labels)
            if not len(arrays.labels):
                log.error("category %s: every image failed; it has no metrics", cat)
                per_category[cat] = {key: math.nan for key in METRIC_KEYS}
                continue
            metrics, cat_curves = evaluate_with_curves(arrays.masks, arrays.maps, arrays.labels, arrays.scores)
            per_category[cat] = metrics
            curves[cat] = cat_curves
            examples += cat_examples
            if arrays_dir is not None:
                _save_arrays(arrays_dir / "arrays" / f"{slug(cat)}.npz", arrays)
            if keep_arrays:
                kept[cat] = arrays
    return per_category, curves, examples, failures, kept, counts


@dataclass
class CategoryPlan:
    """A dataset split grouped by category, each with its name in the engine's catalog and, k-shot, the normal
    references it is inspected with: what eval and calibrate both work through (`each_category`)."""

    groups: dict[str, list[Sample]]  # dataset category -> its samples
    names: dict[str, str]  # dataset category -> catalog name
    shots: dict[str, list[str]] = field(default_factory=dict)  # dataset category -> reference image paths

    @property
    def images(self) -> int:
        return sum(len(g) for g in self.groups.values())


def plan_categories(engine: InspectionEngine, root: str | Path, *, layout: str = "auto",
                    categories: list[str] | None = None, split: str = "test", batch_size: int = 8,
                    max_images: int | None = None, shots: int = 0, shot_seed: int = 0) -> CategoryPlan:
    """List the split (at most `max_images` per category), match every category to the engine's catalog and
    draw its k-shot references: every problem (a broken dataset, an unknown category, too few good training
    images, a batch size below 1, negative shots) is raised here, before any image is inspected."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if shots < 0:
        raise ValueError(f"shots must be at least 0, not {shots}")
    root = Path(root)
    groups = group_by_category(limit_per_category(read_dataset(root, layout, categories, split), max_images))
    names = {cat: catalog_name(engine.catalog, cat) for cat in groups}
    drawn = {cat: draw_shots(root, layout, cat, shots, shot_seed) for cat in groups} if shots else {}
    return CategoryPlan(groups, names, drawn)


def each_category(engine: InspectionEngine, todo: CategoryPlan) -> Iterator[tuple[str, str, list[Sample]]]:
    """(dataset category, catalog name, samples) in turn; while the caller works on one, the engine holds that
    category's k-shot references (if any), and its own ones again afterwards."""
    for cat, group in todo.groups.items():
        with using_references(engine, todo.names[cat], todo.shots.get(cat)):
            yield cat, todo.names[cat], group


def draw_shots(root: Path, layout: str, category: str, k: int, seed: int) -> list[str]:
    """The k-shot protocol: K normal images drawn at random (seeded per category) from its good *training* images.

    The draw for one category does not depend on which other categories are evaluated.
    """
    good = sorted(str(s.image_path) for s in read_dataset(root, layout, [category], "train") if s.label == 0)
    if len(good) < k:
        raise ValueError(f"category {category}: {k} shots asked for, but only {len(good)} good training images")
    rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
    return [good[i] for i in sorted(rng.choice(len(good), size=k, replace=False))]


@contextmanager
def using_references(engine: InspectionEngine, name: str, paths: list[str] | None):
    """With `paths`: the category inspects with those references, and gets its previous ones back after."""
    if not paths:
        yield
        return
    from service.catalog.references import read_reference_files

    previous = engine.references.sets.get(name)
    engine.references.set(name, read_reference_files(paths, engine.references.max_image_pixels))
    try:
        yield
    finally:
        engine.references.clear(name)
        if previous is not None:
            engine.references.set(name, previous)


def inspect_samples(engine: InspectionEngine, name: str, group: list[Sample], batch_size: int, grounding: bool,
                    ) -> Iterator[tuple[int, Sample, np.ndarray, np.ndarray | None, Any]]:
    """A category's images through the engine in batches: (index, sample, image, mask, InspectResult or
    InspectError) per image, in order. The one batched inspection loop of the lab (eval and calibrate)."""
    from service.core.types import InspectRequest

    for start in range(0, len(group), batch_size):
        chunk = group[start:start + batch_size]
        loaded = [load_sample(s) for s in chunk]
        reqs = [InspectRequest(image=img, category=name, grounding=grounding) for img, _ in loaded]
        for k, (sample, (image, mask), res) in enumerate(zip(chunk, loaded, engine.inspect_batch(reqs), strict=True)):
            yield start + k, sample, image, mask, res


def _run_category(engine: InspectionEngine, name: str, group: list[Sample], batch_size: int, grounding: bool,
                  mask_mode: tuple[str, str], n_examples: int, bar) -> tuple[CategoryArrays, list[dict], list]:
    """Inspect one category's images in batches; returns its arrays, example rows and failures."""
    from service.core.types import InspectError

    size = engine.image_size
    maps, masks, labels, scores, paths = [], [], [], [], []
    examples: list[dict] = []
    failures: list[tuple[str, str]] = []
    mask_unknown = False
    want = _example_indices(group, n_examples)
    for index, sample, image, mask, res in inspect_samples(engine, name, group, batch_size, grounding):
        bar.update(1)
        if isinstance(res, InspectError):
            failures.append((str(sample.image_path), res.message))
            log.error("%s: %s", sample.image_path, res.message)
            continue
        frame_mask = None if mask is None else resize_crop_mask(mask, size, *mask_mode)
        mask_unknown |= frame_mask is None
        maps.append(np.asarray(res.anomaly_map, np.float32))
        masks.append(frame_mask)
        labels.append(sample.label)
        scores.append(float(res.score))
        paths.append(str(sample.image_path))
        if index in want:
            examples.append(_example(sample, image, frame_mask, res, size))
    arrays = CategoryArrays(
        masks=None if mask_unknown or not masks else np.stack(masks).astype(np.uint8),
        maps=np.stack(maps) if maps else np.zeros((0, size, size), np.float32),
        labels=np.asarray(labels, np.int64),
        scores=np.asarray(scores, np.float64),
        paths=paths,
    )
    return arrays, examples, failures


def _example_indices(group: list[Sample], n: int) -> set[int]:
    """The first anomalous image and the first normal one (then more anomalous ones), up to n."""
    anomalous = [i for i, s in enumerate(group) if s.label == 1]
    normal = [i for i, s in enumerate(group) if s.label == 0]
    order = anomalous[:1] + normal[:1] + anomalous[1:]
    return set(order[:n])


def _example(sample: Sample, image: np.ndarray, mask: np.ndarray | None, res, size: int) -> dict:
    """One row of the example grid, in the model frame (where maps, masks and frame boxes live)."""
    return {
        "image": resize_crop_image(image, size),
        "anomaly_map": res.anomaly_map,
        "mask": mask,
        "boxes": [b.frame for b in res.boxes if b.valid],
        "title": f"{sample.category}/{sample.defect_type}/{sample.image_path.stem}",
        "score": float(res.score),
    }


def _save_arrays(path: Path, arrays: CategoryArrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        maps=arrays.maps,
        masks=arrays.masks if arrays.masks is not None else np.zeros((0,), np.uint8),
        masks_known=np.asarray(arrays.masks is not None),
        labels=arrays.labels,
        scores=arrays.scores,
        paths=np.asarray(arrays.paths),
    )


def load_arrays(path: str | Path) -> CategoryArrays:
    """Read back an arrays/<category>.npz written by `evaluate_dataset(save_arrays=True)`."""
    with np.load(path) as z:
        return CategoryArrays(
            masks=z["masks"] if bool(z["masks_known"]) else None,
            maps=z["maps"],
            labels=z["labels"],
            scores=z["scores"],
            paths=[str(p) for p in z["paths"]],
        )


def provenance(engine: InspectionEngine, grounding: bool) -> dict[str, Any]:
    """What a reproduction must match: backbone and activation, checkpoint bytes, grounding model."""
    info = engine.model_info()
    return {
        "backbone": info.get("backbone"),
        "activation": info.get("activation"),
        "clip_weights": info.get("clip_weights"),
        "image_size": info.get("image_size"),
        "tap_layout": info.get("tap_layout"),
        "checkpoint": info.get("checkpoint"),
        "checkpoint_sha256": info.get("checkpoint_sha256"),
        "grounding_model": info.get("grounding_model") if grounding else None,
        "profile": info.get("profile"),
    }


def provenance_line(p: dict[str, Any]) -> str:
    """One human-readable line of `provenance`, for the Markdown report and the console."""
    ckpt = f"{Path(p['checkpoint']).name} (sha256 {p['checkpoint_sha256']})" if p.get("checkpoint") else "random heads"
    return (f"backbone {p['backbone']} ({str(p['activation']).upper()}, weights {p['clip_weights']}, "
            f"{p['image_size']} px, taps {p['tap_layout']}); checkpoint {ckpt}; "
            f"grounding {p['grounding_model'] or 'off'}; profile {p['profile']}")


def _write_info(path: Path, engine: InspectionEngine, root: Path, layout: str, split: str, grounding: bool,
                mask_mode: str, max_images: int | None, result: EvalResult) -> None:
    prov = provenance(engine, grounding)
    markdown = path.parent / "metrics.md"
    if markdown.exists():
        with markdown.open("a", encoding="utf-8") as f:
            f.write(f"\nModel: {provenance_line(prov)}\n")
    info = {
        "provenance": prov,
        "model": engine.model_info(),
        "dataset": {"root": str(root), "layout": detect_layout(root) if layout == "auto" else layout,
                    "split": split, "max_images_per_category": max_images, "images": result.images},
        "grounding": grounding,
        "mask": mask_mode,  # interpolation/geometry
        "seconds": round(result.seconds, 3),
        "failures": [{"image": p, "message": m} for p, m in result.failures],
        "shots": {"k": len(next(iter(result.shot_images.values()), [])), "images": result.shot_images},
    }
    path.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
