"""The files `filo eval` leaves behind: metric tables, ROC curves and example pictures.

Inputs are plain numbers and numpy arrays, so the report can be written from any evaluation (the
model, a baseline, stored results) and tested without a model. Figures are drawn on matplotlib's
object API (`Figure`, rendered by the Agg backend), never through pyplot's global state, so writing
a report is safe from any thread and never opens a window.

Written under OUT:
    metrics.md    Markdown table: one row per category, the seven metrics in % (1 decimal), a mean row
    metrics.csv   the same numbers as fractions at full precision (NaN as "nan")
    metrics.json  the same, NaN as null
    roc/<category>.png  image-level and pixel-level ROC curves of each category
    examples.png  one row per example: image with boxes, heatmap overlay, ground-truth mask
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from filo_lab.evaluation.metrics import METRIC_KEYS

METRIC_LABELS = {
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "pixel_f1max": "pixel F1-max",
    "aupro": "AUPRO",
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "image_f1max": "image F1-max",
}
MEAN_ROW = "mean"


def write_report(
    out_dir: str | Path,
    per_category: dict[str, dict[str, float]],
    curves_data: dict[str, dict[str, dict[str, np.ndarray]]] | None = None,
    examples: list[dict] | None = None,
) -> dict[str, object]:
    """Write the report files; return their paths.

    per_category: {category: {metric key: fraction in [0, 1] or NaN}} (the output of
    `filo_lab.evaluation.metrics.evaluate`). curves_data: {category: {"image_roc": {"fpr", "tpr"}, "pixel_roc":
    {"fpr", "tpr"}}} (from `filo_lab.evaluation.metrics.evaluate_with_curves`). examples: dicts with "image"
    (HxWx3 uint8), "anomaly_map" (float, any size: resized to the image), and optionally "mask"
    (HxW 0/1 or None when unknown), "boxes" ([(x1, y1, x2, y2)] in image pixels), "title" and "score".
    Returns {"markdown", "csv", "json": Path, "roc": {category: Path}, "examples": Path or None}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_metrics(per_category)
    paths: dict[str, object] = {
        "markdown": out / "metrics.md",
        "csv": out / "metrics.csv",
        "json": out / "metrics.json",
    }
    paths["markdown"].write_text(format_table(per_category) + "\n", encoding="utf-8")
    _write_csv(paths["csv"], per_category)
    _write_json(paths["json"], per_category)
    paths["roc"] = {
        category: draw_roc(
            out / "roc" / f"{slug(category)}.png", category, curves, per_category.get(category)
        )
        for category, curves in (curves_data or {}).items()
    }
    paths["examples"] = draw_examples(out / "examples.png", examples) if examples else None
    return paths


# ----------------------------------------------------------------------------- tables


def mean_metrics(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the categories where it is defined (NaN if it is nowhere)."""
    means = {}
    for key in METRIC_KEYS:
        values = [row[key] for row in per_category.values() if not math.isnan(row[key])]
        means[key] = float(np.mean(values)) if values else math.nan
    return means


def format_table(per_category: dict[str, dict[str, float]]) -> str:
    """Markdown table, categories as rows, metrics in % with one decimal, and the mean row."""
    header = "| category | " + " | ".join(METRIC_LABELS[k] for k in METRIC_KEYS) + " |"
    rule = "|---|" + "---:|" * len(METRIC_KEYS)
    rows = [_table_row(name, per_category[name]) for name in per_category]
    rows.append(_table_row(f"**{MEAN_ROW}**", mean_metrics(per_category)))
    return "\n".join([header, rule, *rows])


SIDE_BY_SIDE_KEYS = ("pixel_auroc", "aupro", "image_auroc", "image_ap")


def side_by_side(zero: dict[str, dict[str, float]], few: dict[str, dict[str, float]], k: int) -> str:
    """Markdown: per category and for the mean, zero-shot and K-shot figures of the main metrics, in %."""
    heads = [f"{METRIC_LABELS[m]} {tag}" for m in SIDE_BY_SIDE_KEYS for tag in ("0-shot", f"{k}-shot")]
    lines = ["| category | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    rows = [(name, zero[name], few[name]) for name in few]
    rows.append((f"**{MEAN_ROW}**", mean_metrics(zero), mean_metrics(few)))
    for name, z, f in rows:
        lines.append(f"| {name} | " + " | ".join(f"{percent(z[m])} | {percent(f[m])}" for m in SIDE_BY_SIDE_KEYS)
                     + " |")
    return "\n".join(lines)


def percent(value: float) -> str:
    """A fraction as the table shows it: 0.9514 -> "95.1", NaN -> "n/a"."""
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def _table_row(name: str, metrics: dict[str, float]) -> str:
    return f"| {name} | " + " | ".join(percent(metrics[k]) for k in METRIC_KEYS) + " |"


def _check_metrics(per_category: dict[str, dict[str, float]]) -> None:
    for name, metrics in per_category.items():
        missing = [k for k in METRIC_KEYS if k not in metrics]
        if missing:
            raise ValueError(f"category {name!r} lacks the metric(s) {', '.join(missing)}")


def _write_csv(path: Path, per_category: dict[str, dict[str, float]]) -> None:
    rows = {**per_category, MEAN_ROW: mean_metrics(per_category)}
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["category", *METRIC_KEYS])
        for name, metrics in rows.items():
            writer.writerow([name, *(repr(float(metrics[k])) for k in METRIC_KEYS)])


def _write_json(path: Path, per_category: dict[str, dict[str, float]]) -> None:
    def clean(metrics: dict[str, float]) -> dict[str, float | None]:
        return {k: None if math.isnan(metrics[k]) else float(metrics[k]) for k in METRIC_KEYS}

    document = {
        "metrics": list(METRIC_KEYS),
        "categories": {name: clean(metrics) for name, metrics in per_category.items()},
        MEAN_ROW: clean(mean_metrics(per_category)),
    }
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def slug(name: str) -> str:
    """A file-name-safe form of a category name ("metal nut" -> "metal_nut")."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") or "category"


# ----------------------------------------------------------------------------- ROC curves


def draw_roc(
    path: Path, category: str, curves: dict[str, dict[str, np.ndarray]], metrics: dict[str, float] | None
) -> Path:
    """Image-level and pixel-level ROC curves of one category, side by side."""
    figure = Figure(figsize=(8, 4), dpi=100, layout="constrained")
    for axes, level in zip(figure.subplots(1, 2), ("image", "pixel")):
        curve = curves.get(f"{level}_roc", {})
        fpr, tpr = np.asarray(curve.get("fpr", [])), np.asarray(curve.get("tpr", []))
        auroc = (metrics or {}).get(f"{level}_auroc", math.nan)
        if fpr.size:
            axes.plot(fpr, tpr, lw=1.5, label=f"AUROC {percent(auroc)}")
            axes.legend(loc="lower right")
        else:
            axes.text(0.5, 0.5, "undefined", ha="center", va="center")
        axes.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
        axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
        axes.set_title(f"{category}: {level} ROC")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


# ----------------------------------------------------------------------------- examples


def draw_examples(path: Path, examples: list[dict]) -> Path:
    """A grid, one row per example: image with boxes, heatmap over the image, ground-truth mask.

    The heatmaps share one colour scale, because the pixel metrics compare pixels across images.
    """
    low, high = _shared_range([np.asarray(e["anomaly_map"], dtype=np.float32) for e in examples])
    figure = Figure(figsize=(9, 3 * len(examples)), dpi=80, layout="constrained")
    axes = np.asarray(figure.subplots(len(examples), 3, squeeze=False))
    for row, example in zip(axes, examples):
        _draw_example(row, example, low, high)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def _shared_range(maps: list[np.ndarray]) -> tuple[float, float]:
    low = min(float(m.min()) for m in maps)
    high = max(float(m.max()) for m in maps)
    return low, high if high > low else low + 1.0


def _draw_example(row, example: dict, low: float, high: float) -> None:
    image = np.asarray(example["image"], dtype=np.uint8)
    height, width = image.shape[:2]
    heat = np.asarray(example["anomaly_map"], dtype=np.float32)
    if heat.shape != (height, width):
        heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)
    title = example.get("title", "")
    if example.get("score") is not None:
        title = f"{title}  score {example['score']:.3f}".strip()
    row[0].imshow(image)
    for x1, y1, x2, y2 in example.get("boxes") or []:
        row[0].add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", lw=1.5))
    row[0].set_title(title or "image", fontsize=9)
    row[1].imshow(image)
    shown = row[1].imshow(heat, cmap="jet", alpha=0.5, vmin=low, vmax=high)
    row[1].figure.colorbar(shown, ax=row[1], fraction=0.046)
    row[1].set_title("anomaly map", fontsize=9)
    mask = example.get("mask")
    if mask is None:
        row[2].imshow(np.zeros((height, width)), cmap="gray", vmin=0, vmax=1)
        row[2].text(width / 2, height / 2, "mask unknown", color="white", ha="center", va="center")
    else:
        row[2].imshow(np.asarray(mask) > 0.5, cmap="gray", vmin=0, vmax=1)
    row[2].set_title("ground truth", fontsize=9)
    for axes in row:
        axes.set_axis_off()
