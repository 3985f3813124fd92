"""Evaluation metrics for anomaly detection and localisation (spec section 9).

One public entry point, `evaluate(masks, maps, labels, scores)`, returns the seven numbers the
FiLo paper reports per category. Their definitions follow the released FiLo test code:

- AUROC = `sklearn.metrics.roc_auc_score`, AP = `average_precision_score`, F1-max = the largest
  2PR/(P+R) over every cut between distinct scores (the points of `precision_recall_curve`); image
  F1-max is `service.catalog.thresholds.f1_max_threshold`'s, the one home of that computation.
- Pixel metrics pool every pixel of every image; masks are binarised with `> 0.5`.
- AUPRO: PRO(t) is the mean, over every connected anomalous region of every image (8-connectivity,
  like `skimage.measure.label`'s default for 2-D), of the fraction of the region's pixels whose map
  value is >= t; FPR(t) is the fraction of normal pixels with value >= t.

Why not simply call scikit-learn on the pooled pixels: VisA's test set is 2,162 maps of 518x518
(580M pixels); scikit-learn would make float64 copies, an int64 argsort and float64 cumulative
sums of all of them (well over 10 GB). Instead the pixel metrics run on one exact "sweep" over the distinct map values:

1. Maps are evaluated as float32 (the model's output dtype; float64 input is rounded to float32 once,
   so values that round together become one threshold). A float32 maps one-to-one and in order onto
   a uint32 "key"; -0.0 counts as +0.0 and NaN is refused.
2. Pass 0 reads the maps chunk by chunk: it labels the regions of each mask (scipy.ndimage.label) and
   histograms the top 16 bits of the keys (65,536 buckets).
3. The occupied buckets are cut into value ranges ("groups") small enough to aggregate in bounded
   memory: either by direct counting over the group's keys (np.bincount over at most
   `bins_per_pass` keys) or, for sparse ranges, by sorting the group's few pixels (np.sort).
   Each group costs one more read of the maps; groups are processed from the highest value down.
4. Per distinct value the sweep needs three additive numbers: normal pixels, anomalous pixels, and
   the sum over its anomalous pixels of 1 / area(region). PRO at a threshold is that last sum,
   accumulated over all values >= t, divided by the number of regions, so no per-region state is kept.

Every distinct value is an operating point, so nothing is quantised: the results equal
scikit-learn's (AUROC, AP, F1-max) on the same float32 values, up to float64 rounding. Measured with
scripts/bench_metrics.py on 2 CPU cores: 580M pixels in about 35 s, about 0.7 GB above the inputs.

AUPRO integration convention ("exact", the default): the operating points are (FPR(t), PRO(t)) for
every distinct value t in decreasing order, preceded by (0, 0) (a threshold above every value). PRO
is integrated over FPR by the trapezoid rule between consecutive operating points from FPR 0 up to
`max_fpr` (0.3); the segment crossing `max_fpr` is cut there, with PRO linearly interpolated, and the
area is divided by `max_fpr` so that a perfect map scores 1. This is the convention of the MVTec AD
evaluation code. With `aupro_convention="released"` the released FiLo code's approximation is
reproduced instead: 200 evenly spaced thresholds from the minimum to the maximum value, strict
`>` threshold, points with FPR < 0.3 kept, their FPRs min-max rescaled to [0, 1], then trapezoids.

Degenerate inputs give NaN with a `MetricWarning`, never an exception: a category with no anomalous
pixel (or masks=None, ground truth unknown) has no pixel AUROC/AP/F1-max/AUPRO; one with no normal
pixel has no pixel AUROC/AUPRO; image metrics need both labels present.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score, roc_curve

from service.catalog.thresholds import f1_max_threshold

METRIC_KEYS = (
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1max",
    "aupro",
    "image_auroc",
    "image_ap",
    "image_f1max",
)
PIXEL_KEYS = METRIC_KEYS[:4]
IMAGE_KEYS = METRIC_KEYS[4:]
AUPRO_CONVENTIONS = ("exact", "released")

_BUCKET_BITS = 16  # low key bits inside one histogram bucket
_N_BUCKETS = 1 << (32 - _BUCKET_BITS)
_BUCKET_WIDTH = 1 << _BUCKET_BITS
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_CURVE_CELLS = 1000  # plotting curves keep about one point per 1/1000 of either axis

DEFAULT_CHUNK_PIXELS = 1 << 22  # pixels read per step (float32: 16 MB)
DEFAULT_BINS_PER_PASS = 1 << 22  # keys counted directly per pass (3 arrays x 8 bytes x 4M = 96 MB)
DEFAULT_SORT_BUDGET = 1 << 23  # pixels a sparse group may gather for sorting
_FLUSH_PIXELS = 1 << 24  # gathered keys are counted in batches of about this many


class MetricWarning(UserWarning):
    """A metric is undefined for this input (for instance, no anomalous pixel) and is NaN."""


# ----------------------------------------------------------------------------- public API


def evaluate(
    masks: np.ndarray | None,
    maps: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    max_fpr: float = 0.3,
    aupro_convention: str = "exact",
) -> dict[str, float]:
    """The seven metrics of one category.

    masks (N, H, W) ground truth (>0.5 is anomalous; None when unknown), maps (N, H, W) anomaly maps,
    labels (N,) 0/1 image labels, scores (N,) image scores. Returns the keys of `METRIC_KEYS`
    as Python floats in [0, 1] (NaN where undefined, with a `MetricWarning`).
    """
    metrics, _ = evaluate_with_curves(
        masks, maps, labels, scores, max_fpr=max_fpr, aupro_convention=aupro_convention
    )
    return metrics


def evaluate_with_curves(
    masks: np.ndarray | None,
    maps: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    max_fpr: float = 0.3,
    aupro_convention: str = "exact",
) -> tuple[dict[str, float], dict[str, dict[str, np.ndarray]]]:
    """`evaluate` plus the curves a report draws.

    The curves dict has "image_roc" and "pixel_roc" ({"fpr", "tpr"}) and "pro" ({"fpr", "pro"}, up
    to `max_fpr`); pixel curves are thinned to about a thousand points, enough to draw.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal 1-D shapes")
    if len(maps) != labels.shape[0]:
        raise ValueError(f"{len(maps)} maps but {labels.shape[0]} labels")
    image, image_curve = _image_metrics_and_curve(labels, scores)
    pixel, pixel_curves = pixel_metrics_and_curves(
        masks, maps, max_fpr=max_fpr, aupro_convention=aupro_convention
    )
    metrics = {**pixel, **image}
    return {key: metrics[key] for key in METRIC_KEYS}, {"image_roc": image_curve, **pixel_curves}


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Image AUROC, AP and F1-max (keys `IMAGE_KEYS`) from 0/1 labels and scores."""
    return _image_metrics_and_curve(np.asarray(labels), np.asarray(scores))[0]


def pixel_metrics(
    masks: np.ndarray | None,
    maps: np.ndarray,
    *,
    max_fpr: float = 0.3,
    aupro_convention: str = "exact",
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
    bins_per_pass: int = DEFAULT_BINS_PER_PASS,
    sort_budget: int = DEFAULT_SORT_BUDGET,
) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AUPRO (keys `PIXEL_KEYS`); see the module docstring."""
    return pixel_metrics_and_curves(
        masks,
        maps,
        max_fpr=max_fpr,
        aupro_convention=aupro_convention,
        chunk_pixels=chunk_pixels,
        bins_per_pass=bins_per_pass,
        sort_budget=sort_budget,
    )[0]


def pixel_metrics_and_curves(
    masks: np.ndarray | None,
    maps: np.ndarray,
    *,
    max_fpr: float = 0.3,
    aupro_convention: str = "exact",
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
    bins_per_pass: int = DEFAULT_BINS_PER_PASS,
    sort_budget: int = DEFAULT_SORT_BUDGET,
) -> tuple[dict[str, float], dict[str, dict[str, np.ndarray]]]:
    """Pixel metrics and their thinned "pixel_roc" / "pro" curves.

    `chunk_pixels`, `bins_per_pass` and `sort_budget` only trade memory for passes over the maps;
    every setting gives the same numbers (the tests shrink them to exercise every path).
    """
    if aupro_convention not in AUPRO_CONVENTIONS:
        raise ValueError(f"aupro_convention must be one of {AUPRO_CONVENTIONS}, not {aupro_convention!r}")
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], not {max_fpr}")
    maps = _as_stack(maps, "maps")
    if maps.shape[0] == 0:
        raise ValueError("no maps to evaluate")
    if masks is None:
        _warn("ground-truth masks are unknown: pixel metrics are NaN")
        return _nan_pixel_metrics(), _empty_pixel_curves()
    masks = _as_stack(masks, "masks")
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")

    source = _Source(masks, maps, max(1, chunk_pixels // (maps.shape[1] * maps.shape[2])))
    prep = _prepare(source)
    if prep.n_pos == 0:
        _warn("no anomalous pixel in the masks: pixel AUROC, AP, F1-max and AUPRO are NaN")
        return _nan_pixel_metrics(), _empty_pixel_curves()
    released = _released_thresholds(prep) if aupro_convention == "released" else None
    sweep = _Sweep(prep.n_pos, prep.n_neg, prep.n_regions, max_fpr, released)
    for group in _plan_groups(prep.hist, bins_per_pass, sort_budget):
        sweep.update(*_aggregate(source, prep, group))
    return sweep.results(aupro_convention)


# ----------------------------------------------------------------------------- image level


def _image_metrics_and_curve(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """scikit-learn's image metrics, as the released code computes them."""
    y = (labels > 0.5).astype(np.int8)
    s = scores.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError("image scores must be finite")
    if y.min(initial=1) == y.max(initial=0):
        _warn("image labels hold a single class: image AUROC, AP and F1-max are NaN")
        return {key: math.nan for key in IMAGE_KEYS}, {"fpr": np.zeros(0), "tpr": np.zeros(0)}
    fpr, tpr, _ = roc_curve(y, s)
    metrics = {
        "image_auroc": float(roc_auc_score(y, s)),
        "image_ap": float(average_precision_score(y, s)),
        "image_f1max": f1_max_threshold(s, y)[1],  # the service's calibration computes the same F1-max
    }
    return metrics, {"fpr": fpr, "tpr": tpr}


# ----------------------------------------------------------------------------- inputs


def _as_stack(array: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W) view of `array`; (N, 1, H, W) and a single (H, W) are accepted too."""
    array = np.asarray(array) if not isinstance(array, np.ndarray) else array
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W), got shape {array.shape}")
    return array


def _warn(message: str) -> None:
    warnings.warn(message, MetricWarning, stacklevel=3)


def _nan_pixel_metrics() -> dict[str, float]:
    return {key: math.nan for key in PIXEL_KEYS}


def _empty_pixel_curves() -> dict[str, dict[str, np.ndarray]]:
    return {
        "pixel_roc": {"fpr": np.zeros(0), "tpr": np.zeros(0)},
        "pro": {"fpr": np.zeros(0), "pro": np.zeros(0)},
    }


class _Source:
    """Reads masks and maps a few images at a time, as float32 values and boolean ground truth."""

    def __init__(self, masks: np.ndarray, maps: np.ndarray, chunk_images: int):
        self.masks = masks
        self.maps = maps
        self.bounds = [
            (i, min(i + chunk_images, maps.shape[0])) for i in range(0, maps.shape[0], chunk_images)
        ]

    def chunks(self):
        """Yield (chunk index, values float32 (n, H, W), anomalous bool (n, H, W))."""
        for index, (lo, hi) in enumerate(self.bounds):
            values = np.ascontiguousarray(self.maps[lo:hi], dtype=np.float32)
            yield index, values, np.asarray(self.masks[lo:hi]) > 0.5


# ----------------------------------------------------------------------------- float keys


def float_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving uint32 keys of float32 values (a < b iff key(a) < key(b)); -0.0 -> key(+0.0)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    keys = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))
    keys[keys == np.uint32(0x7FFFFFFF)] = np.uint32(0x80000000)
    return keys


def keys_to_floats(keys: np.ndarray) -> np.ndarray:
    """Inverse of `float_keys`."""
    keys = np.asarray(keys, dtype=np.uint32)
    bits = np.where(keys >> 31 == 1, keys & np.uint32(0x7FFFFFFF), ~keys)
    return bits.astype(np.uint32).view(np.float32)


# ----------------------------------------------------------------------------- pass 0


@dataclass
class _Prepared:
    """What pass 0 learns: totals, regions, value histogram."""

    n_pos: int = 0
    n_neg: int = 0
    n_regions: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(_N_BUCKETS, dtype=np.int64))
    region_ids: list[np.ndarray] = field(default_factory=list)  # per chunk, per anomalous pixel (C order)
    inv_area: np.ndarray = field(default_factory=lambda: np.zeros(0))  # 1 / area per region id
    vmin: float = math.inf
    vmax: float = -math.inf


def _prepare(source: _Source) -> _Prepared:
    """Pass 0: validate values, label regions, histogram the keys' top bits."""
    prep = _Prepared()
    areas: list[np.ndarray] = []
    for _, values, positive in source.chunks():
        if np.isnan(values).any():
            raise ValueError("anomaly maps contain NaN")
        prep.hist += np.bincount((float_keys(values) >> _BUCKET_BITS).ravel(), minlength=_N_BUCKETS)
        prep.vmin = min(prep.vmin, float(values.min()))
        prep.vmax = max(prep.vmax, float(values.max()))
        n_pos = int(np.count_nonzero(positive))
        prep.n_pos += n_pos
        prep.n_neg += positive.size - n_pos
        ids, chunk_areas = _label_regions(positive, prep.n_regions)
        prep.region_ids.append(ids)
        prep.n_regions += chunk_areas.size
        areas.append(chunk_areas)
    prep.inv_area = 1.0 / np.concatenate(areas).astype(np.float64) if prep.n_regions else np.zeros(0)
    return prep


def _label_regions(positive: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Global region id of every anomalous pixel of a chunk (C order) and each new region's area."""
    ids, areas = [], []
    for image in positive:
        if not image.any():
            continue
        labelled, count = ndimage.label(image, structure=_EIGHT_CONNECTED)
        local = labelled[image]
        ids.append(local.astype(np.int32) + np.int32(offset - 1))
        areas.append(np.bincount(local, minlength=count + 1)[1:])
        offset += count
    if not ids:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    return np.concatenate(ids), np.concatenate(areas)


# ----------------------------------------------------------------------------- groups


@dataclass
class _Group:
    """Consecutive key buckets aggregated in one pass; `lo`/`hi` bound its values."""

    first: int  # lowest bucket number
    last: int  # highest bucket number (inclusive)
    pixels: int
    by_sort: bool
    lo: float | None  # values >= lo (None: no lower bound)
    hi: float | None  # values < hi (None: no upper bound)

    @property
    def base_key(self) -> int:
        return self.first << _BUCKET_BITS

    @property
    def width(self) -> int:
        return (self.last - self.first + 1) * _BUCKET_WIDTH


def _plan_groups(hist: np.ndarray, bins_per_pass: int, sort_budget: int) -> list[_Group]:
    """Cut the occupied buckets, from the highest down, into groups of bounded memory.

    A group is counted directly when its buckets span at most `bins_per_pass` keys, else sorted when
    it holds at most `sort_budget` pixels; a single bucket is always countable.
    """
    occupied = np.flatnonzero(hist)
    max_span = max(1, bins_per_pass // _BUCKET_WIDTH)
    groups: list[_Group] = []
    top = occupied.size  # exclusive end of the next group within `occupied`
    while top > 0:
        last = int(occupied[top - 1])
        start, pixels = top - 1, int(hist[last])
        while start > 0:
            more = pixels + int(hist[occupied[start - 1]])
            if last - int(occupied[start - 1]) + 1 > max_span and more > sort_budget:
                break
            start, pixels = start - 1, more
        first = int(occupied[start])
        lo = None if start == 0 else _bucket_floor(first)
        hi = None if top == occupied.size else _bucket_floor(int(occupied[top]))
        groups.append(_Group(first, last, pixels, last - first + 1 > max_span, lo, hi))
        top = start
    return groups


def _bucket_floor(bucket: int) -> float:
    """The smallest float32 value whose key falls in `bucket` (or beyond it, for a bucket of -inf)."""
    key = max(bucket << _BUCKET_BITS, int(float_keys(np.array([-np.inf], dtype=np.float32))[0]))
    return float(keys_to_floats(np.array([key], dtype=np.uint32))[0])


# ----------------------------------------------------------------------------- one pass


def _aggregate(source: _Source, prep: _Prepared, group: _Group):
    """Per distinct value of the group, descending: (values, anomalous, normal, PRO weight)."""
    gathered = _Gathered(group)
    for index, values, positive in source.chunks():
        selected = _select(values, group)
        if selected is None:
            neg_values, pos_values = values[~positive], values[positive]
            pos_ids = prep.region_ids[index]
        else:
            neg_values, pos_values = values[selected & ~positive], values[selected & positive]
            pos_ids = prep.region_ids[index][selected[positive]]
        gathered.add(float_keys(neg_values), float_keys(pos_values), prep.inv_area[pos_ids])
    keys, n_pos, n_neg, weight = gathered.runs()
    return keys_to_floats(keys)[::-1], n_pos[::-1], n_neg[::-1], weight[::-1]


def _select(values: np.ndarray, group: _Group) -> np.ndarray | None:
    """Boolean mask of the values in the group's range (None: every value)."""
    if group.lo is None and group.hi is None:
        return None
    if group.lo is None:
        return values < np.float32(group.hi)
    if group.hi is None:
        return values >= np.float32(group.lo)
    return (values >= np.float32(group.lo)) & (values < np.float32(group.hi))


class _Gathered:
    """One group's keys, turned into per-key counts by bincount (dense) or by sorting (sparse)."""

    def __init__(self, group: _Group):
        self.group = group
        self.neg: list[np.ndarray] = []
        self.pos: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.size = 0
        self.counts: list[np.ndarray] | None = None  # anomalous, normal, weight per key of the span

    def add(self, neg_keys: np.ndarray, pos_keys: np.ndarray, pos_weights: np.ndarray) -> None:
        self.neg.append(neg_keys)
        self.pos.append(pos_keys)
        self.weights.append(pos_weights)
        self.size += neg_keys.size + pos_keys.size
        if not self.group.by_sort and self.size >= _FLUSH_PIXELS:
            self._count()

    def runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Ascending (keys, anomalous, normal, weight) of the keys that occur."""
        if self.group.by_sort:
            return self._sorted_runs()
        self._count()
        n_pos, n_neg, weight = self.counts
        index = np.flatnonzero(n_pos + n_neg)
        keys = (index + self.group.base_key).astype(np.uint32)
        return keys, n_pos[index], n_neg[index], weight[index]

    def _take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        neg = np.concatenate(self.neg) if self.neg else np.zeros(0, np.uint32)
        pos = np.concatenate(self.pos) if self.pos else np.zeros(0, np.uint32)
        weights = np.concatenate(self.weights) if self.weights else np.zeros(0)
        self.neg, self.pos, self.weights, self.size = [], [], [], 0
        return neg, pos, weights

    def _count(self) -> None:
        """Add the gathered keys to the per-key counts over the group's span."""
        neg, pos, weights = self._take()
        base, width = np.uint32(self.group.base_key), self.group.width
        # bincount casts uint32 input slowly; an explicit intp copy is several times faster.
        neg_index, pos_index = (neg - base).astype(np.intp), (pos - base).astype(np.intp)
        counts = [
            np.bincount(pos_index, minlength=width),
            np.bincount(neg_index, minlength=width),
            np.bincount(pos_index, weights=weights, minlength=width),
        ]
        if self.counts is None:
            self.counts = counts
        else:
            for total, part in zip(self.counts, counts):
                total += part

    def _sorted_runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        neg, pos, weights = self._take()
        neg_keys, n_neg = _run_lengths(np.sort(neg))
        order = np.argsort(pos)
        pos_keys, n_pos = _run_lengths(pos[order])
        pos_weight = np.add.reduceat(weights[order], np.cumsum(n_pos) - n_pos) if pos.size else np.zeros(0)
        keys, _ = _run_lengths(np.sort(np.concatenate([neg_keys, pos_keys])))
        counts = [np.zeros(keys.size, np.int64), np.zeros(keys.size, np.int64), np.zeros(keys.size)]
        at_pos, at_neg = np.searchsorted(keys, pos_keys), np.searchsorted(keys, neg_keys)
        counts[0][at_pos], counts[1][at_neg], counts[2][at_pos] = n_pos, n_neg, pos_weight
        return keys.astype(np.uint32), *counts


def _run_lengths(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a sorted array and how often each occurs."""
    if sorted_keys.size == 0:
        return sorted_keys, np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
    return sorted_keys[starts], np.diff(np.append(starts, sorted_keys.size))


# ----------------------------------------------------------------------------- the sweep


def _released_thresholds(prep: _Prepared, steps: int = 200) -> np.ndarray:
    """The thresholds of the released code: np.arange(min, max, (max - min) / 200) on float32."""
    lo, hi = np.float32(prep.vmin), np.float32(prep.vmax)
    if hi <= lo:
        return np.zeros(0)
    return np.arange(lo, hi, (hi - lo) / steps).astype(np.float64)[::-1]  # descending


class _Sweep:
    """Accumulates every metric over the operating points, visited from the highest value down."""

    def __init__(self, n_pos: int, n_neg: int, n_regions: int, max_fpr: float, released: np.ndarray | None):
        self.n_pos, self.n_neg, self.n_regions = n_pos, n_neg, max(n_regions, 1)
        self.max_fpr = max_fpr
        self.tp, self.fp, self.weight = 0, 0, 0.0
        self.auc2 = 0.0  # twice the ROC area in units of (normal x anomalous pixels)
        self.ap = 0.0
        self.f1 = 0.0
        self.pro_area, self.pro_done = 0.0, False
        self.last_fpr, self.last_pro = 0.0, 0.0
        self.roc: list[np.ndarray] = [np.zeros((1, 2))]
        self.pro: list[np.ndarray] = [np.zeros((1, 2))]
        self.last_cell = -1.0
        self.released = released
        self.released_pending = 0  # index of the next unresolved released threshold
        self.released_points = np.zeros((0 if released is None else released.size, 2))

    def update(self, values: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray, weight: np.ndarray) -> None:
        """Add one group's distinct values (descending) and their per-value counts."""
        tp = self.tp + np.cumsum(n_pos)
        fp = self.fp + np.cumsum(n_neg)
        cum_weight = self.weight + np.cumsum(weight)
        prev_tp = np.concatenate([[self.tp], tp[:-1]])
        self.auc2 += float(np.dot(n_neg.astype(np.float64), (tp + prev_tp).astype(np.float64)))
        precision = tp / (tp + fp)
        self.ap += float(np.dot(n_pos.astype(np.float64), precision)) / self.n_pos
        self.f1 = max(self.f1, float(np.max(2.0 * tp / (tp + fp + self.n_pos))))
        fpr = fp / self.n_neg if self.n_neg else np.zeros(fp.size)
        pro = cum_weight / self.n_regions
        self._integrate_pro(fpr, pro)
        self._keep_curve_points(fpr, tp / self.n_pos, pro)
        if self.released is not None:
            self._resolve_released(values, fpr, pro)
        self.tp, self.fp, self.weight = int(tp[-1]), int(fp[-1]), float(cum_weight[-1])

    def _integrate_pro(self, fpr: np.ndarray, pro: np.ndarray) -> None:
        """Trapezoids of PRO over FPR up to max_fpr; the crossing segment is cut by interpolation."""
        if self.pro_done or self.n_neg == 0:
            return
        x = np.concatenate([[self.last_fpr], fpr])
        y = np.concatenate([[self.last_pro], pro])
        inside = int(np.searchsorted(x, self.max_fpr, side="right"))  # x[:inside] <= max_fpr
        self.pro_area += float(np.sum((x[1:inside] - x[: inside - 1]) * (y[1:inside] + y[: inside - 1]))) / 2
        if inside < x.size:
            x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
            y_cut = y0 + (y1 - y0) * (self.max_fpr - x0) / (x1 - x0)
            self.pro_area += (self.max_fpr - x0) * (y0 + y_cut) / 2
            self.pro_done = True
        self.last_fpr, self.last_pro = float(x[-1]), float(y[-1])

    def _keep_curve_points(self, fpr: np.ndarray, tpr: np.ndarray, pro: np.ndarray) -> None:
        """Thin the curves for drawing: the first point of every 1/1000 x 1/1000 cell."""
        cells = np.floor(fpr * _CURVE_CELLS) * (_CURVE_CELLS + 1) + np.floor(tpr * _CURVE_CELLS)
        previous = np.concatenate([[self.last_cell], cells[:-1]])
        keep = cells != previous
        keep[-1] = True  # the group's last point, so the final (1, 1) survives
        self.roc.append(np.stack([fpr[keep], tpr[keep]], axis=1))
        in_range = keep & (fpr <= self.max_fpr)
        self.pro.append(np.stack([fpr[in_range], pro[in_range]], axis=1))
        self.last_cell = float(cells[-1])

    def _resolve_released(self, values: np.ndarray, fpr: np.ndarray, pro: np.ndarray) -> None:
        """(FPR, PRO) of `map > T` for the released thresholds T that this group settles."""
        thresholds = self.released
        lowest = float(values[-1])
        descending = -values.astype(np.float64)  # ascending
        while self.released_pending < thresholds.size and thresholds[self.released_pending] >= lowest:
            t = thresholds[self.released_pending]
            above = int(np.searchsorted(descending, -t, side="left"))  # values > t
            if above == 0:  # nothing of this group is above t: the state before it
                point = (self.fp / self.n_neg if self.n_neg else 0.0, self.weight / self.n_regions)
            else:
                point = (fpr[above - 1], pro[above - 1])
            self.released_points[self.released_pending] = point
            self.released_pending += 1

    def results(self, convention: str) -> tuple[dict[str, float], dict[str, dict[str, np.ndarray]]]:
        metrics = {
            "pixel_auroc": self.auc2 / (2.0 * self.n_pos * self.n_neg) if self.n_neg else math.nan,
            "pixel_ap": self.ap,
            "pixel_f1max": self.f1,
            "aupro": self._aupro(convention),
        }
        if self.n_neg == 0:
            _warn("no normal pixel in the masks: pixel AUROC and AUPRO are NaN")
            metrics["aupro"] = math.nan
        roc = np.concatenate(self.roc)
        pro = np.concatenate(self.pro)
        curves = {
            "pixel_roc": {"fpr": roc[:, 0], "tpr": roc[:, 1]},
            "pro": {"fpr": pro[:, 0], "pro": pro[:, 1]},
        }
        return {k: float(np.clip(v, 0.0, 1.0)) for k, v in metrics.items()}, curves  # clip rounding

    def _aupro(self, convention: str) -> float:
        if convention == "exact":
            return self.pro_area / self.max_fpr
        return _released_aupro(self.released_points, self.max_fpr)


def _released_aupro(points: np.ndarray, max_fpr: float) -> float:
    """The released code's normalisation of its sampled (FPR, PRO) points."""
    fpr, pro = points[::-1, 0], points[::-1, 1]  # ascending thresholds, as the released loop ran
    keep = fpr < max_fpr
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size < 2 or fpr.max() == fpr.min():
        _warn("too few released-convention thresholds below max_fpr: AUPRO is NaN")
        return math.nan
    return float(auc((fpr - fpr.min()) / (fpr.max() - fpr.min()), pro))
