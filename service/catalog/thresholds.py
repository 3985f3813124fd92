"""Per-category decision thresholds: from labelled images (F1-max) or from the normal references alone.

A threshold is stored with its category in the catalog (as a `ThresholdRecord`, see
service/catalog/references.py for where). `resolve` turns it into the category's `ThresholdRule` (threshold,
source and review margin together), and `ThresholdRule.verdict` decides `is_anomalous` and `needs_review` of
a score. This is the one rule: the engine applies it to every result it returns (so every worker and the
embedded server decide alike, and the API only shapes the answer), and `GET /v1/categories/{name}` shows the
rule the engine resolved, never a second computation. Sources, in the response's `threshold_source`:

- `labelled`: the F1-max cut over the scores of labelled good and defective images (what APRIL-GAN's
  authors recommend to users); valid for the reference set it was measured with (its digest is
  stored), because references change the score scale. After the references change, the category
  falls back to `default` until it is calibrated again; likewise when the model version (backbone,
  checkpoint) differs from the one that produced the scores.
- `references`: from the references' leave-one-out scores (each reference scored with the others as
  its memory, `models.references.leave_one_out_scores`): their maximum plus a margin of
  REFERENCE_MARGIN_SPREAD times their spread (max - min), at least REFERENCE_MARGIN_MIN. Recomputed
  whenever the references change, so it is never stale; needs at least 2 references.
- `learned`: `labelled`, from the judgements inspectors gave the category's recorded results
  (`POST /v1/categories/{name}/learn`); it holds under the same conditions as `labelled`.
- `manual`: set by an admin by hand; holds until changed, whatever the references or the model.
- `default`: `FILO_THRESHOLDS[category]` or `FILO_DEFAULT_THRESHOLD` (0.5).

Labelled calibration has one home here, whoever scores the images: `LabelledScores` gathers (score, label)
pairs (`POST /v1/categories/{name}/calibrate` scores through the backend, `filo calibrate` through the
engine) and `labelled_threshold(scores, labels)`, the pure rule, turns them into the F1-max cut and its stats.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from service.core.errors import ServiceError

STORED_SOURCES = ("labelled", "references", "learned", "manual")  # what a ThresholdRecord may say
REFERENCE_MARGIN_SPREAD = 0.5
REFERENCE_MARGIN_MIN = 0.01


@dataclass(frozen=True)
class ThresholdRecord:
    """What the catalog stores: a labelled value with the reference digest it holds for, or the references rule."""

    source: str  # one of STORED_SOURCES
    threshold: float | None = None  # labelled only
    references_digest: str | None = None  # labelled: the references the scores were measured with ("" none)
    n_good: int = 0
    n_defective: int = 0
    model_version: str | None = None  # labelled: the model that produced the scores
    review_margin: float = 0.0  # results within this of the threshold wait for a person's judgement

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> ThresholdRecord:
        doc = json.loads(raw)
        if doc.get("source") not in STORED_SOURCES:
            raise ValueError(f"threshold source must be one of {STORED_SOURCES}, not {doc.get('source')!r}")
        return cls(**{k: doc.get(k) for k in ("source", "threshold", "references_digest", "model_version")},
                   n_good=int(doc.get("n_good", 0)), n_defective=int(doc.get("n_defective", 0)),
                   review_margin=float(doc.get("review_margin") or 0.0))


def f1_max_threshold(scores: Sequence[float], labels: Sequence[int]) -> tuple[float, float]:
    """(threshold, F1) of the cut `score >= threshold` with the highest F1 on labelled scores.

    The threshold is set halfway between the lowest score called defective and the highest one
    below it (not on a sample itself), so a repeat of the same image lands on the same side.
    Needs at least one defective image; raises ValueError otherwise.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, np.int64)
    if s.shape != y.shape or not len(s):
        raise ValueError("scores and labels must be non-empty and of one length")
    if not (y == 1).any():
        raise ValueError("F1-max needs at least one defective image")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    last = np.r_[s[1:] != s[:-1], True]  # cut after each run of tied scores
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    f1 = np.where(last, f1, -1)
    k = int(np.argmax(f1))
    below = s[k + 1] if k + 1 < len(s) else s[k] - max(REFERENCE_MARGIN_MIN, 1e-6)
    return float((s[k] + below) / 2), float(f1[k])


class NotEnoughLabelled(ValueError):
    """A labelled threshold needs at least one good and one defective score."""

    def __init__(self, n_good: int, n_defective: int) -> None:
        super().__init__(f"a labelled threshold needs good and defective scores ({n_good} and {n_defective})")
        self.n_good = n_good
        self.n_defective = n_defective


@dataclass(frozen=True)
class LabelledThreshold:
    """The F1-max cut over labelled scores, with what it was measured on (each class's scores, in order)."""

    threshold: float
    f1: float
    good: tuple[float, ...]
    defective: tuple[float, ...]

    @property
    def n_good(self) -> int:
        return len(self.good)

    @property
    def n_defective(self) -> int:
        return len(self.defective)

    def scores(self) -> dict[str, list[float]]:
        return {"good": list(self.good), "defective": list(self.defective)}

    def record(self, references_digest: str, model_version: str | None) -> ThresholdRecord:
        """What the catalog stores: valid for these references and this model only."""
        return ThresholdRecord("labelled", self.threshold, references_digest, self.n_good, self.n_defective,
                               model_version)


def labelled_threshold(scores: list[float], labels: list[bool]) -> LabelledThreshold:
    """The F1-max threshold of labelled scores (`labels[i]`: image i is defective) and its stats.

    Pure: the service's calibration, `filo calibrate` and a recalibration from human-reviewed results all
    come here. Raises NotEnoughLabelled without both a good and a defective score.
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    good = tuple(float(s) for s, defective in zip(scores, labels, strict=True) if not defective)
    bad = tuple(float(s) for s, defective in zip(scores, labels, strict=True) if defective)
    if not good or not bad:
        raise NotEnoughLabelled(len(good), len(bad))
    threshold, f1 = f1_max_threshold(scores, [int(bool(y)) for y in labels])
    return LabelledThreshold(threshold, f1, good, bad)


@dataclass
class LabelledScores:
    """Labelled scores as they are gathered, from whatever scored the images, with the models that did."""

    scores: list[float] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    model_versions: set[Any] = field(default_factory=set)

    def add(self, score: float, defective: bool, model_version: Any = None) -> None:
        self.scores.append(float(score))
        self.labels.append(bool(defective))
        self.model_versions.add(model_version)

    def model_version(self) -> Any:
        """The one model that scored every image; 409 `model_changed` where a rolling deploy answered with two
        (their scores are not one scale)."""
        if len(self.model_versions) > 1:
            versions = sorted(self.model_versions, key=str)
            raise ServiceError(409, "model_changed", f"the images were scored by different models {versions}; "
                               "calibrate again once every worker runs the same one")
        return next(iter(self.model_versions), None)

    def threshold(self) -> LabelledThreshold:
        """`labelled_threshold` of what was gathered; raises NotEnoughLabelled, or ServiceError (model_changed)."""
        self.model_version()
        return labelled_threshold(self.scores, self.labels)


def reference_threshold(loo_scores: Sequence[float]) -> float | None:
    """The references rule: max + max(REFERENCE_MARGIN_MIN, REFERENCE_MARGIN_SPREAD * (max - min)); None below 2."""
    if len(loo_scores) < 2:
        return None
    hi, lo = max(loo_scores), min(loo_scores)
    return float(hi + max(REFERENCE_MARGIN_MIN, REFERENCE_MARGIN_SPREAD * (hi - lo)))


@dataclass(frozen=True)
class Verdict:
    """What a score means for its category: defective or not, and whether a person should look."""

    is_anomalous: bool
    needs_review: bool


@dataclass(frozen=True)
class ThresholdRule:
    """A category's decision rule as it applies now: the threshold, where it comes from, and the review band
    (results within `review_margin` of the threshold wait for a person's judgement; 0 turns the band off)."""

    threshold: float
    source: str
    review_margin: float = 0.0

    def verdict(self, score: float) -> Verdict:
        return Verdict(is_anomalous=score >= self.threshold,
                       needs_review=self.review_margin > 0 and abs(score - self.threshold) <= self.review_margin)

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "source": self.source, "review_margin": self.review_margin}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ThresholdRule:
        return cls(float(doc["threshold"]), str(doc["source"]), float(doc.get("review_margin") or 0.0))


def resolve(record: ThresholdRecord | None, references_digest: str, loo_scores: Sequence[float],
            default: float, model_version: str | None = None) -> ThresholdRule:
    """The category's rule: the stored record where it still holds, else the default; the review margin is the
    record's whichever threshold holds (a band set by hand outlives a lapsed calibration)."""
    margin = float(record.review_margin) if record is not None and math.isfinite(record.review_margin) else 0.0
    if record is not None and record.source == "manual" and record.threshold is not None \
            and math.isfinite(record.threshold):
        return ThresholdRule(float(record.threshold), "manual", margin)
    if record is not None and record.source in ("labelled", "learned") and record.threshold is not None \
            and record.references_digest == references_digest and math.isfinite(record.threshold) \
            and record.model_version in (None, model_version):
        return ThresholdRule(float(record.threshold), record.source, margin)
    if record is not None and record.source == "references":
        value = reference_threshold(loo_scores)
        if value is not None:
            return ThresholdRule(value, "references", margin)
    return ThresholdRule(float(default), "default", margin)
