"""`filo eval` end to end with the demo profile on a tiny generated dataset, and models/evaluation.py.

The report's numbers must be exactly `filo_lab.evaluation.metrics.evaluate` on the arrays the run produced (saved
with --save-arrays), the masks must be the ground truth brought into the model frame, and every
picture must decode.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filo_lab.data import load_sample, read_dataset, resize_crop_mask
from filo_lab.data.synth import generate
from filo_lab.evaluation.metrics import METRIC_KEYS, evaluate
from filo_lab.evaluation.report import format_table, percent
from filo_lab.evaluation.runner import limit_per_category, load_arrays

CATEGORIES = ["fabric", "pill"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two categories of 6 test images (2 good + 1 per defect kind) at 80 x 64 (not square)."""
    root = tmp_path_factory.mktemp("evaldata")
    generate(root, CATEGORIES, n_train=0, n_good=2, n_defect=1, size=(80, 64), seed=11)
    return root


@pytest.fixture(scope="module")
def eval_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("evalout") / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "eval", "--data", str(dataset), "--profile", "demo",
         "--grounding", "off", "--out", str(out), "--save-arrays", "--batch-size", "4"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    return proc, out


def test_eval_writes_the_report_files(eval_run):
    proc, out = eval_run
    assert proc.returncode == 0, proc.stderr
    assert "DEMO PROFILE" in proc.stderr
    for name in ("metrics.md", "metrics.csv", "metrics.json", "examples.png", "eval_info.json"):
        assert (out / name).is_file(), name
    for cat in CATEGORIES:
        assert (out / "roc" / f"{cat}.png").is_file()
        assert (out / "arrays" / f"{cat}.npz").is_file()
    info = json.loads((out / "eval_info.json").read_text())
    assert info["dataset"]["images"] == {"fabric": 6, "pill": 6} and info["dataset"]["layout"] == "mvtec"
    assert info["grounding"] is False and info["failures"] == [] and info["model"]["profile"] == "demo"
    # a reproduction is traceable: backbone, activation, the checkpoint's bytes, the grounding model
    prov = info["provenance"]
    assert prov["backbone"] == "FiLo-Tiny-CLIP" and prov["activation"] == "quickgelu"
    assert prov["grounding_model"] is None and prov["checkpoint"].endswith("filo-demo-tiny.safetensors")
    assert prov["checkpoint_sha256"] == hashlib.sha256(Path(prov["checkpoint"]).read_bytes()).hexdigest()
    assert f"sha256 {prov['checkpoint_sha256']}" in (out / "metrics.md").read_text()
    assert "model: backbone FiLo-Tiny-CLIP (QUICKGELU" in proc.stderr


def test_eval_table_equals_metrics_on_the_saved_arrays(eval_run):
    proc, out = eval_run
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((out / "metrics.json").read_text())
    recomputed = {}
    for cat in CATEGORIES:
        arrays = load_arrays(out / "arrays" / f"{cat}.npz")
        assert arrays.maps.shape == (6, 518, 518) and arrays.maps.dtype == np.float32
        assert arrays.masks.shape == (6, 518, 518) and set(np.unique(arrays.masks)) <= {0, 1}
        assert arrays.labels.tolist().count(1) == 4
        recomputed[cat] = evaluate(arrays.masks, arrays.maps, arrays.labels, arrays.scores)
        for key in METRIC_KEYS:
            assert saved["categories"][cat][key] == pytest.approx(recomputed[cat][key], abs=1e-12), (cat, key)
    table = format_table(recomputed)
    table_part, model_line = (out / "metrics.md").read_text().strip().rsplit("\n\n", 1)
    assert table_part == table and model_line.startswith("Model: backbone FiLo-Tiny-CLIP (QUICKGELU")
    assert table in proc.stdout  # the printed table
    mean_row = next(line for line in table.splitlines() if "mean" in line)
    for key in METRIC_KEYS:
        mean = np.mean([recomputed[c][key] for c in CATEGORIES])
        assert saved["mean"][key] == pytest.approx(mean, abs=1e-12)
        assert f" {percent(mean)} " in mean_row
    assert all(0.0 <= v <= 1.0 for v in saved["mean"].values())


def test_eval_masks_are_the_ground_truth_in_the_model_frame(eval_run, dataset):
    _, out = eval_run
    arrays = load_arrays(out / "arrays" / "pill.npz")
    samples = read_dataset(dataset, "mvtec", ["pill"], "test")
    assert arrays.paths == [str(s.image_path) for s in samples]
    for sample, mask in zip(samples, arrays.masks):
        _, original = load_sample(sample)
        assert np.array_equal(mask, resize_crop_mask(original, 518, "bilinear"))
        assert mask.any() == bool(sample.label)


def test_eval_pictures_decode(eval_run):
    _, out = eval_run
    for path in [out / "examples.png", *(out / "roc").glob("*.png")]:
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG" and min(image.size) > 100
            assert np.asarray(image.convert("L")).std() > 1  # not a blank canvas
    with Image.open(out / "examples.png") as grid:  # 2 rows per category
        assert grid.size[1] > grid.size[0]


def test_eval_refuses_unknown_categories_and_bad_data(dataset, tmp_path, capsys):
    from service.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["eval", "--data", str(tmp_path / "empty"), "--profile", "demo", "--grounding", "off",
                 "--out", str(tmp_path / "o1")]) == 2
    assert "layout" in capsys.readouterr().err
    assert main(["eval", "--data", str(dataset), "--categories", "carpet", "--profile", "demo",
                 "--grounding", "off", "--out", str(tmp_path / "o2")]) == 2
    assert "carpet" in capsys.readouterr().err


def test_evaluate_dataset_in_process_with_grounding_and_limits(dataset, tmp_path):
    """The library entry point with the demo Grounding DINO, a per-category limit and kept arrays."""
    from service.engine.pipeline import InspectionEngine
    from service.settings import FiloSettings

    engine = InspectionEngine.from_settings(
        FiloSettings(profile="demo", grounding=True, descriptions=[dataset / "descriptions.json"]))
    from filo_lab.evaluation.runner import evaluate_dataset

    result = evaluate_dataset(engine, dataset, categories=["pill"], max_images=3, batch_size=2,
                              grounding=True, keep_arrays=True, progress=False, out_dir=tmp_path / "r")
    assert result.images == {"pill": 3} and not result.failures
    kept = result.arrays["pill"]
    # evenly spaced: the good image first, then defects, so both labels are present
    assert kept.labels.tolist() == [s.label for s in limit_per_category(
        read_dataset(dataset, "mvtec", ["pill"], "test"), 3)]
    assert set(kept.labels.tolist()) == {0, 1}
    assert result.per_category["pill"] == pytest.approx(
        evaluate(kept.masks, kept.maps, kept.labels, kept.scores), nan_ok=True)
    assert not math.isnan(result.per_category["pill"]["pixel_auroc"])
    assert (tmp_path / "r" / "examples.png").is_file()


def test_side_by_side_puts_zero_and_k_shot_figures_of_each_category_and_the_mean_together():
    from filo_lab.evaluation.report import side_by_side

    zero = {"a": dict.fromkeys(METRIC_KEYS, 0.5), "b": dict.fromkeys(METRIC_KEYS, 0.7)}
    few = {"a": dict.fromkeys(METRIC_KEYS, 0.9), "b": dict.fromkeys(METRIC_KEYS, 1.0)}
    lines = side_by_side(zero, few, 4).splitlines()
    assert lines[0].count("0-shot") == lines[0].count("4-shot") == 4
    assert lines[2] == "| a | 50.0 | 90.0 | 50.0 | 90.0 | 50.0 | 90.0 | 50.0 | 90.0 |"
    assert lines[-1] == "| **mean** | 60.0 | 95.0 | 60.0 | 95.0 | 60.0 | 95.0 | 60.0 | 95.0 |"
