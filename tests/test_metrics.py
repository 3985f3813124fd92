"""filo_lab.evaluation.metrics against scikit-learn and against plain brute-force references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from filo_lab.evaluation import metrics
from filo_lab.evaluation.metrics import METRIC_KEYS, MetricWarning, evaluate, float_keys, keys_to_floats, pixel_metrics

EIGHT = np.ones((3, 3), dtype=bool)
# Tiny memory settings force many groups and chunk boundaries, through the sorting path (TINY, as the
# groups' pixels are few) or only the counting one (COUNTING: nothing may be sorted).
TINY = {"chunk_pixels": 100, "bins_per_pass": 1 << 16, "sort_budget": 50}
COUNTING = {"chunk_pixels": 100, "bins_per_pass": 1 << 17, "sort_budget": 0}


# ----------------------------------------------------------------------------- brute-force references


def _regions(masks: np.ndarray) -> list[np.ndarray]:
    """Boolean (N, H, W) arrays, one per 8-connected region of every image."""
    regions = []
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=EIGHT)
        for region in range(1, count + 1):
            full = np.zeros(masks.shape, dtype=bool)
            full[index] = labelled == region
            regions.append(full)
    return regions


def brute_pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold, `map >= t`, highest first, preceded by (0, 0)."""
    masks = masks > 0.5
    regions = _regions(masks)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        detected = maps >= t
        pros.append(np.mean([detected[r].mean() for r in regions]))
        fprs.append((detected & ~masks).sum() / (~masks).sum())
    return np.array(fprs), np.array(pros)


def brute_aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Trapezoids up to max_fpr with the crossing segment interpolated, divided by max_fpr."""
    fpr, pro = brute_pro_curve(masks, maps)
    area = 0.0
    for i in range(1, fpr.size):
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + y_cut) / 2
            break
    return area / max_fpr


def brute_released_aupro(masks: np.ndarray, maps: np.ndarray) -> float:
    """The released FiLo cal_pro_score, written out plainly."""
    masks = (masks > 0.5).astype(np.uint8)
    lo, hi = maps.min(), maps.max()
    delta = (hi - lo) / 200
    pros, fprs = [], []
    for th in np.arange(lo, hi, delta):
        binary = maps > th
        pro = []
        for b, m in zip(binary, masks):
            labelled, count = ndimage.label(m, structure=EIGHT)
            for region in range(1, count + 1):
                pro.append(b[labelled == region].mean())
        inverse = 1 - masks
        fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
        pros.append(np.mean(pro))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < 0.3
    fprs = fprs[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros[keep])


def sorted_aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """A second, vectorised exact AUPRO (one global argsort): checks bigger inputs than brute force can."""
    masks = masks > 0.5
    weights = np.zeros(masks.shape)
    n_regions = 0
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=EIGHT)
        areas = np.bincount(labelled.ravel())
        weights[index][mask] = 1.0 / areas[labelled[mask]]
        n_regions += count
    values = maps.ravel()
    order = np.argsort(-values, kind="stable")
    last_of_run = np.append(values[order][1:] != values[order][:-1], True)
    fpr = np.cumsum(~masks.ravel()[order])[last_of_run] / (~masks).sum()
    pro = np.cumsum(weights.ravel()[order])[last_of_run] / n_regions
    fpr, pro = np.append(0.0, fpr), np.append(0.0, pro)
    cut = int(np.searchsorted(fpr, max_fpr, side="right"))
    y_cut = np.interp(max_fpr, fpr[cut - 1 : cut + 1], pro[cut - 1 : cut + 1])
    x = np.append(fpr[:cut], max_fpr)
    y = np.append(pro[:cut], y_cut)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2 / max_fpr)


def brute_f1max(y: np.ndarray, s: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(y, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))


def random_case(seed: int, n: int = 4, h: int = 12, w: int = 10, levels: int | None = 40):
    """Blobby masks and maps that score anomalies higher; `levels` quantises values to force ties."""
    rng = np.random.default_rng(seed)
    masks = ndimage.uniform_filter(rng.random((n, h, w)), size=(1, 3, 3)) > 0.6
    masks[0] = False  # one normal image
    maps = rng.random((n, h, w)) + 0.8 * masks * rng.random((n, h, w))
    if levels:
        maps = np.round(maps * levels) / levels
    return masks.astype(np.uint8), maps.astype(np.float32)


# ----------------------------------------------------------------------------- pixel metrics


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("settings", [{}, TINY, COUNTING], ids=["default", "sorting", "counting"])
def test_pixel_metrics_match_sklearn_and_brute_force(seed, settings):
    masks, maps = random_case(seed, levels=None if seed % 2 else 40)
    got = pixel_metrics(masks, maps, **settings)
    y, s = masks.ravel(), maps.ravel().astype(np.float64)
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert got["pixel_f1max"] == pytest.approx(brute_f1max(y, s), abs=1e-12)
    assert got["aupro"] == pytest.approx(brute_aupro(masks, maps), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_released_convention_matches_the_released_loop(seed):
    masks, maps = random_case(seed, levels=None if seed % 2 else 40)
    got = pixel_metrics(masks, maps, aupro_convention="released", **TINY)
    assert got["aupro"] == pytest.approx(brute_released_aupro(masks, maps), abs=1e-12)


def test_counting_in_several_flushes(monkeypatch):
    """Large groups are counted in batches; batches must add up to the one-batch answer."""
    masks, maps = random_case(11, n=6, h=20, w=20, levels=None)
    whole = pixel_metrics(masks, maps)
    monkeypatch.setattr(metrics, "_FLUSH_PIXELS", 37)
    assert pixel_metrics(masks, maps, chunk_pixels=150) == whole


def test_bigger_smooth_maps_against_sklearn_and_a_sorting_reference():
    """Thousands of distinct values, smooth maps and blob masks, like real ones."""
    rng = np.random.default_rng(5)
    maps = ndimage.gaussian_filter(rng.random((12, 64, 64)), sigma=(0, 3, 3))
    masks = ndimage.gaussian_filter(rng.random((12, 64, 64)), sigma=(0, 4, 4)) > 0.53
    masks[:4] = False
    maps = (maps + 0.05 * masks).astype(np.float32)
    assert np.unique(maps).size > 40_000
    got = pixel_metrics(masks, maps, bins_per_pass=1 << 17, sort_budget=5000)
    y, s = masks.ravel(), maps.ravel().astype(np.float64)
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert got["pixel_f1max"] == pytest.approx(brute_f1max(y, s), abs=1e-12)
    assert got["aupro"] == pytest.approx(sorted_aupro(masks, maps), abs=1e-12)


def test_sorting_reference_agrees_with_brute_force():
    for seed in range(3):
        masks, maps = random_case(seed, levels=None if seed % 2 else 40)
        assert sorted_aupro(masks, maps) == pytest.approx(brute_aupro(masks, maps), abs=1e-12)


def test_values_spread_over_many_binades_and_signs():
    """Sparse, wide value ranges take the sorting path; infinities and -0.0 are fine."""
    rng = np.random.default_rng(7)
    masks, _ = random_case(3, n=3, h=16, w=16)
    maps = (rng.standard_normal(masks.shape) * 10.0 ** rng.integers(-20, 20, masks.shape)).astype(np.float32)
    maps[masks > 0] += 1e3
    maps[0, 0, :3] = [np.inf, -np.inf, -0.0]
    maps[0, 1, :2] = [0.0, 0.0]
    for settings in ({}, TINY, COUNTING, {"bins_per_pass": 1 << 16, "sort_budget": 10**9}):
        got = pixel_metrics(masks, maps, **settings)
        y = masks.ravel()
        s = np.clip(maps.ravel().astype(np.float64), -1e300, 1e300)  # scikit-learn refuses infinities
        assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert got["aupro"] == pytest.approx(brute_aupro(masks, maps), abs=1e-12)


def test_tiny_settings_take_the_paths_they_claim():
    masks, maps = random_case(0)
    prep = metrics._prepare(metrics._Source(masks, maps, 1))
    for settings, sorted_groups in ((TINY, True), (COUNTING, False)):
        groups = metrics._plan_groups(prep.hist, settings["bins_per_pass"], settings["sort_budget"])
        assert len(groups) > 3 and all(g.by_sort == sorted_groups for g in groups)


def test_float_keys_keep_order_and_round_trip():
    values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-38, 0.5, 2.0, np.inf], dtype=np.float32)
    keys = float_keys(values)
    assert np.all(np.diff(keys.astype(np.int64)) >= 0)
    assert keys[3] == keys[4]  # -0.0 is +0.0
    np.testing.assert_array_equal(keys_to_floats(keys)[[0, 1, 2, 5, 6, 7, 8]], values[[0, 1, 2, 5, 6, 7, 8]])


# ----------------------------------------------------------------------------- hand-made cases


def _two_images() -> tuple[np.ndarray, np.ndarray]:
    masks = np.zeros((2, 20, 20), dtype=np.uint8)
    masks[1, 4:10, 4:10] = 1
    masks[1, 14:18, 12:19] = 1
    return masks, masks.astype(np.float32)


def test_perfect_map_scores_one():
    masks, maps = _two_images()
    got = evaluate(masks, maps * 0.9 + 0.05, np.array([0, 1]), np.array([0.1, 0.9]))
    assert set(got) == set(METRIC_KEYS)
    assert all(isinstance(v, float) for v in got.values())
    assert all(v == pytest.approx(1.0) for v in got.values())


def test_inverted_map_scores_zero():
    masks, maps = _two_images()
    got = evaluate(masks, 1.0 - maps, np.array([0, 1]), np.array([0.9, 0.1]))
    assert got["pixel_auroc"] == pytest.approx(0.0)
    assert got["image_auroc"] == pytest.approx(0.0)
    assert got["aupro"] == pytest.approx(0.0)


def test_one_region_half_detected():
    """Half of the only region is hot at FPR 0: PRO is 1/2 until the cold half is reached."""
    masks = np.zeros((1, 10, 10), dtype=np.uint8)
    masks[0, 2:6, 2:6] = 1
    maps = np.zeros((1, 10, 10), dtype=np.float32)
    maps[0, 2:4, 2:6] = 1.0  # the region's top half
    got = pixel_metrics(masks, maps)
    # Points: (0, 0) -> (0, 0.5) at t=1 -> (1, 1) at t=0: PRO(x) = 0.5 + 0.5x on [0, 0.3].
    assert got["aupro"] == pytest.approx((0.5 + 0.5 * 0.15), abs=1e-12)
    assert got["aupro"] == pytest.approx(brute_aupro(masks, maps), abs=1e-12)


def test_regions_are_eight_connected_and_weighted_equally():
    """Two diagonal pixels are one region; a small region counts as much as a big one."""
    masks = np.zeros((1, 12, 12), dtype=np.uint8)
    masks[0, 1, 1] = masks[0, 2, 2] = 1  # one diagonal region of 2 pixels
    masks[0, 6:11, 6:11] = 1  # a 25-pixel region
    maps = np.zeros((1, 12, 12), dtype=np.float32)
    maps[0, 1, 1] = maps[0, 2, 2] = 1.0  # the small region found, the big one missed
    got = pixel_metrics(masks, maps)
    assert got["aupro"] == pytest.approx(0.5 + 0.5 * 0.15, abs=1e-12)  # PRO jumps to 1/2, not 2/27


# ----------------------------------------------------------------------------- image metrics and API


def test_image_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = rng.random(50) + 0.3 * labels
    got = metrics.image_metrics(labels, scores)
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert got["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    assert got["image_f1max"] == pytest.approx(brute_f1max(labels, scores))


def test_curves_are_monotone_and_complete():
    masks, maps = random_case(1, levels=None)
    _, curves = metrics.evaluate_with_curves(masks, maps, np.array([0, 1, 1, 1]), np.arange(4.0))
    roc = curves["pixel_roc"]
    assert roc["fpr"][0] == 0 and roc["tpr"][0] == 0 and roc["fpr"][-1] == 1 and roc["tpr"][-1] == 1
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
    assert curves["pro"]["fpr"].max() <= 0.3
    assert curves["image_roc"]["fpr"][-1] == 1


# ----------------------------------------------------------------------------- degenerate inputs


def test_no_anomalous_pixel_gives_nan_with_a_warning():
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    with pytest.warns(MetricWarning, match="no anomalous pixel"):
        got = evaluate(masks, maps, np.array([0, 1]), np.array([0.2, 0.8]))
    assert all(math.isnan(got[k]) for k in metrics.PIXEL_KEYS)
    assert got["image_auroc"] == 1.0


def test_only_anomalous_pixels():
    masks = np.ones((1, 4, 4), dtype=np.uint8)
    maps = np.random.default_rng(0).random((1, 4, 4)).astype(np.float32)
    with pytest.warns(MetricWarning, match="no normal pixel"):
        got = pixel_metrics(masks, maps)
    assert math.isnan(got["pixel_auroc"]) and math.isnan(got["aupro"])
    assert got["pixel_ap"] == 1.0 and got["pixel_f1max"] == 1.0


def test_single_image_class_and_unknown_masks():
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = evaluate(None, maps, np.array([1, 1]), np.array([0.3, 0.4]))
    assert all(math.isnan(v) for v in got.values())
    assert {str(w.message).split(":")[0] for w in caught} == {
        "ground-truth masks are unknown",
        "image labels hold a single class",
    }


def test_bad_inputs_raise():
    masks, maps = _two_images()
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics(masks, np.where(masks > 0, np.nan, 0).astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        pixel_metrics(masks[:, :10], maps)
    with pytest.raises(ValueError, match="labels"):
        evaluate(masks, maps, np.array([0, 1, 1]), np.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="aupro_convention"):
        pixel_metrics(masks, maps, aupro_convention="paper")
