"""service/catalog/thresholds.py: the F1-max cut, the references rule, which threshold an inspection gets; filo calibrate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.catalog.thresholds import (
    REFERENCE_MARGIN_MIN,
    LabelledScores,
    NotEnoughLabelled,
    ThresholdRecord,
    ThresholdRule,
    Verdict,
    f1_max_threshold,
    labelled_threshold,
    reference_threshold,
    resolve,
)
from service.core.errors import ServiceError


def _brute_f1(scores, labels, t):
    pred = np.asarray(scores) >= t
    y = np.asarray(labels) == 1
    tp, fp, fn = (pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum()
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def test_f1_max_separable_scores_cut_halfway_between_the_classes():
    t, f1 = f1_max_threshold([0.1, 0.2, 0.3, 0.7, 0.8], [0, 0, 0, 1, 1])
    assert t == pytest.approx(0.5) and f1 == 1.0


def test_f1_max_is_the_best_cut_against_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = np.round(rng.random(15), 1)  # many ties
        labels = (rng.random(15) < 0.4).astype(int)
        if not labels.any():
            labels[0] = 1
        t, f1 = f1_max_threshold(scores, labels)
        best = max(_brute_f1(scores, labels, c) for c in np.unique(scores))
        assert f1 == pytest.approx(best) and _brute_f1(scores, labels, t) == pytest.approx(best)
        assert not np.isin(t, scores)  # never exactly on a sample


def test_f1_max_needs_a_defective_image():
    with pytest.raises(ValueError):
        f1_max_threshold([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError):
        f1_max_threshold([], [])


def test_labelled_threshold_is_the_f1_max_cut_with_its_stats():
    """The one labelled rule (the route, filo calibrate and reviewed results call it): scores and bool labels
    in, the F1-max cut, its F1 and each class's scores (in the order given) out; the order does not matter."""
    scores, labels = [0.7, 0.1, 0.3, 0.8, 0.2], [True, False, False, True, False]
    cal = labelled_threshold(scores, labels)
    assert (cal.threshold, cal.f1) == f1_max_threshold(scores, [1, 0, 0, 1, 0]) == (pytest.approx(0.5), 1.0)
    assert (cal.n_good, cal.n_defective) == (3, 2)
    assert cal.scores() == {"good": [0.1, 0.3, 0.2], "defective": [0.7, 0.8]}
    grouped = labelled_threshold([0.1, 0.3, 0.2, 0.7, 0.8], [False] * 3 + [True] * 2)
    assert (grouped.threshold, grouped.f1) == (cal.threshold, cal.f1)
    assert cal.record("abc", "v1") == ThresholdRecord("labelled", cal.threshold, "abc", 3, 2, "v1")
    with pytest.raises(NotEnoughLabelled) as exc:
        labelled_threshold([0.1, 0.2], [False, False])
    assert (exc.value.n_good, exc.value.n_defective) == (2, 0)
    with pytest.raises(ValueError):
        labelled_threshold([0.1], [False, True])


def test_labelled_scores_gather_pairs_and_refuse_two_models():
    gathered = LabelledScores()
    for score, defective in ((0.2, False), (0.9, True), (0.1, False)):
        gathered.add(score, defective, "v1")
    assert gathered.threshold() == labelled_threshold([0.2, 0.9, 0.1], [False, True, False])
    assert gathered.model_version() == "v1"
    gathered.add(0.8, True, "v2")  # a rolling deploy answered with another model
    with pytest.raises(ServiceError) as exc:
        gathered.threshold()
    assert (exc.value.status, exc.value.code) == (409, "model_changed")
    with pytest.raises(NotEnoughLabelled):
        LabelledScores().threshold()


def test_reference_rule_is_max_plus_margin():
    assert reference_threshold([0.3, 0.4, 0.5]) == pytest.approx(0.5 + 0.5 * 0.2)
    assert reference_threshold([0.4, 0.4]) == pytest.approx(0.4 + REFERENCE_MARGIN_MIN)
    assert reference_threshold([0.4]) is None


def test_resolve_uses_a_record_only_where_it_still_holds():
    labelled = ThresholdRecord("labelled", 0.6, "abc", 3, 2)
    assert resolve(labelled, "abc", (), 0.5) == ThresholdRule(0.6, "labelled")
    assert resolve(labelled, "other", (), 0.5) == ThresholdRule(0.5, "default")  # references changed since
    refs = ThresholdRecord("references")
    assert resolve(refs, "abc", (0.2, 0.3), 0.5) == ThresholdRule(pytest.approx(0.35), "references")
    assert resolve(refs, "abc", (), 0.5) == ThresholdRule(0.5, "default")  # no references left
    assert resolve(None, "", (), 0.7) == ThresholdRule(0.7, "default")


def test_the_rule_carries_the_review_band_and_decides_the_verdict():
    banded = ThresholdRecord("manual", 0.4, review_margin=0.05)
    rule = resolve(banded, "", (), 0.5)
    assert rule == ThresholdRule(0.4, "manual", 0.05)
    assert rule.verdict(0.4) == Verdict(is_anomalous=True, needs_review=True)  # on the threshold: NG, and look
    assert rule.verdict(0.36) == Verdict(is_anomalous=False, needs_review=True)
    assert rule.verdict(0.3) == Verdict(is_anomalous=False, needs_review=False)
    assert rule.verdict(0.46) == Verdict(is_anomalous=True, needs_review=False)
    # a lapsed calibration falls back to the default, and keeps the band set beside it
    lapsed = ThresholdRecord("labelled", 0.6, "old", review_margin=0.1)
    assert resolve(lapsed, "new", (), 0.5) == ThresholdRule(0.5, "default", 0.1)
    assert ThresholdRule(0.5, "default", 0.0).verdict(0.5) == Verdict(True, False)  # a margin of 0: never
    assert ThresholdRule.from_dict(rule.to_dict()) == rule


def test_threshold_record_round_trip_and_validation():
    rec = ThresholdRecord("labelled", 0.25, "", 4, 1)
    assert ThresholdRecord.from_json(rec.to_json()) == rec
    with pytest.raises(ValueError):
        ThresholdRecord.from_json(json.dumps({"source": "guess"}))


def test_filo_calibrate_writes_f1_max_thresholds_per_category(tmp_path):
    from filo_lab.data.synth import generate
    from service.cli import main

    generate(tmp_path / "data", categories=["fabric"], n_train=0, n_good=2, n_defect=1, size=64, seed=3)
    out = tmp_path / "thresholds.json"
    code = main(["calibrate", "--profile", "demo", "--image-size", "224", "--data", str(tmp_path / "data"),
                 "--grounding", "off", "--out", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    entry = doc["categories"]["fabric"]
    assert entry["n_good"] == 2 and entry["n_defective"] == 4 and 0 < entry["f1"] <= 1
    t, f1 = f1_max_threshold(entry["scores"]["good"] + entry["scores"]["defective"], [0, 0, 1, 1, 1, 1])
    assert (entry["threshold"], entry["f1"]) == (pytest.approx(t), pytest.approx(f1))
    assert doc["thresholds"] == {"fabric": entry["threshold"]}  # FILO_THRESHOLDS-ready


def test_a_labelled_threshold_holds_only_for_the_model_that_scored_it():
    rec = ThresholdRecord("labelled", 0.3, "", 2, 2, "filo-demo-tiny-aaa")
    assert resolve(rec, "", (), 0.5, "filo-demo-tiny-aaa") == ThresholdRule(0.3, "labelled")
    assert resolve(rec, "", (), 0.5, "filo-demo-tiny-bbb") == ThresholdRule(0.5, "default")  # new checkpoint: stale
    assert ThresholdRecord.from_json(rec.to_json()).model_version == "filo-demo-tiny-aaa"


def test_calibrate_k_shot_scores_with_references_and_gives_the_category_its_own_back(tmp_path):
    """The lab's calibration with `shots`: the scores are those of K-shot inspection, the category holds none of
    the drawn references afterwards, and asking for more shots than good training images is refused."""
    from filo_lab.data.synth import generate
    from filo_lab.evaluation.calibration import calibrate_dataset
    from service.engine.pipeline import InspectionEngine
    from tests.service_fixtures import demo_settings

    data = tmp_path / "data"
    generate(data, categories=["fabric"], n_train=2, n_good=2, n_defect=1, size=64, seed=3)
    engine = InspectionEngine.from_settings(demo_settings(descriptions=[data / "descriptions.json"]))
    zero = calibrate_dataset(engine, data, grounding=False, progress=False)
    few = calibrate_dataset(engine, data, grounding=False, shots=2, progress=False)
    assert zero.complete and few.complete and few.shots == 2
    assert few.categories["fabric"]["shots"] == 2 and few.thresholds() == {"fabric": few.categories["fabric"]["threshold"]}
    assert few.categories["fabric"]["scores"] != zero.categories["fabric"]["scores"]
    assert "fabric" not in engine.references.sets
    with pytest.raises(ValueError, match="3 shots asked for, but only 2 good training images"):
        calibrate_dataset(engine, data, grounding=False, shots=3, progress=False)
