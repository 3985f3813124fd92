"""filo_lab.evaluation.report: the files exist, their numbers are the inputs, the pictures decode."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filo_lab.evaluation.metrics import METRIC_KEYS, evaluate_with_curves
from filo_lab.evaluation.report import format_table, mean_metrics, slug, write_report


def _category(seed: int):
    """Metrics and curves of a small random category."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((6, 16, 16), dtype=np.uint8)
    masks[3:, 4:9, 5:11] = 1
    maps = (rng.random(masks.shape) + masks * 0.5).astype(np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = maps.reshape(6, -1).max(axis=1)
    return evaluate_with_curves(masks, maps, labels, scores)


@pytest.fixture
def results():
    first, first_curves = _category(0)
    second, second_curves = _category(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        third, third_curves = evaluate_with_curves(
            None, np.zeros((2, 4, 4)), np.array([0, 1]), np.array([0.1, 0.2])
        )
    per_category = {"bottle": first, "metal nut": second, "no masks": third}
    curves = {"bottle": first_curves, "metal nut": second_curves, "no masks": third_curves}
    return per_category, curves


def _examples():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[10:20, 30:45] = 1
    return [
        {
            "image": image,
            "anomaly_map": rng.random((20, 30)),
            "mask": mask,
            "boxes": [(28, 8, 47, 22)],
            "title": "bottle/broken 000",
            "score": 0.91,
        },
        {"image": image, "anomaly_map": rng.random((40, 60)), "mask": None, "title": "plate/rust c"},
    ]


def test_report_files_hold_the_input_numbers(tmp_path: Path, results):
    per_category, curves = results
    paths = write_report(tmp_path / "report", per_category, curves, _examples())
    for key in ("markdown", "csv", "json"):
        assert paths[key].is_file()

    lines = paths["markdown"].read_text().strip().splitlines()
    assert lines[0].startswith("| category | pixel AUROC | pixel AP | pixel F1-max | AUPRO |")
    table = {
        cells[0]: cells[1:]
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }
    means = mean_metrics(per_category)
    for name, metrics in [*per_category.items(), ("**mean**", means)]:
        for cell, key in zip(table[name], METRIC_KEYS):
            if math.isnan(metrics[key]):
                assert cell == "n/a"
            else:
                assert float(cell) == pytest.approx(round(100 * metrics[key], 1), abs=1e-9)

    with paths["csv"].open() as handle:
        rows = {row["category"]: row for row in csv.DictReader(handle)}
    document = json.loads(paths["json"].read_text())
    for name, metrics in [*per_category.items(), ("mean", means)]:
        stored = document["mean"] if name == "mean" else document["categories"][name]
        for key in METRIC_KEYS:
            expected = metrics[key]
            if math.isnan(expected):
                assert math.isnan(float(rows[name][key])) and stored[key] is None
            else:
                assert float(rows[name][key]) == expected and stored[key] == expected

    assert set(paths["roc"]) == set(per_category)
    for path in [*paths["roc"].values(), paths["examples"]]:
        with Image.open(path) as picture:
            picture.load()
            assert picture.format == "PNG" and min(picture.size) > 100
    assert paths["roc"]["metal nut"].name == "metal_nut.png"


def test_mean_skips_undefined_categories(results):
    per_category, _ = results
    means = mean_metrics(per_category)
    assert means["image_auroc"] == pytest.approx(np.mean([m["image_auroc"] for m in per_category.values()]))
    assert means["aupro"] == pytest.approx(
        (per_category["bottle"]["aupro"] + per_category["metal nut"]["aupro"]) / 2
    )
    assert math.isnan(mean_metrics({"x": {k: math.nan for k in METRIC_KEYS}})["aupro"])


def test_minimal_report_and_bad_input(tmp_path: Path):
    metrics = {k: 0.5 for k in METRIC_KEYS}
    paths = write_report(tmp_path, {"a": metrics}, None, None)
    assert paths["roc"] == {} and paths["examples"] is None
    assert "| a | 50.0 | 50.0 |" in format_table({"a": metrics})
    with pytest.raises(ValueError, match="lacks the metric"):
        write_report(tmp_path, {"a": {"pixel_auroc": 1.0}})
    assert slug("pipe fryum/2") == "pipe_fryum_2"
