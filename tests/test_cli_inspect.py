"""End-to-end `filo inspect` with the demo profile's tiny models (real architectures, random weights)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import synthetic_image


def _run(args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "service.cli", "inspect", *args, "--profile", "demo"],
                          capture_output=True, text=True, timeout=600, cwd=cwd)
    return proc


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, (h, w) in enumerate([(240, 320), (300, 300)]):
        p = d / f"img{i}.png"
        Image.fromarray(synthetic_image(h, w, seed=i)).save(p)
        paths.append(p)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d, paths


def test_inspect_writes_maps_heatmaps_and_json(images, tmp_path):
    _, paths = images
    out = tmp_path / "out"
    proc = _run([str(p) for p in paths] + ["--category", "bottle", "--out", str(out), "--json"])
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in records] == [str(p) for p in paths]
    assert "DEMO PROFILE" in proc.stderr  # loudly labelled, on stderr, never in the JSON stream
    for rec, p in zip(records, paths):
        assert set(rec) == {"image", "score", "position", "boxes", "top_types", "map", "heatmap"}
        amap = np.load(rec["map"])
        assert amap.dtype == np.float32 and amap.shape == (518, 518)
        assert amap.min() >= 0.0 and amap.max() <= 1.0
        assert 0.0 < rec["score"] < 1.0
        heat = Image.open(rec["heatmap"])
        assert heat.size == Image.open(p).size  # original size
        assert len(rec["top_types"]) == 5 and all(set(t) == {"description", "similarity"} for t in rec["top_types"])
        assert rec["position"] in {None, "top left", "top", "top right", "left", "center", "right",
                                   "bottom left", "bottom", "bottom right"}
        for b in rec["boxes"]:
            assert {"x1", "y1", "x2", "y2", "phrase", "confidence"} <= set(b)


def test_grounding_off_averages_positions_and_suppresses_nothing(images, tmp_path):
    _, paths = images
    out = tmp_path / "off"
    proc = _run([str(paths[1]), "--category", "pcb1", "--grounding", "off", "--out", str(out), "--json"])
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["position"] is None and rec["boxes"] == []
    amap = np.load(rec["map"])
    # no suppression: the score's map half equals the written map's maximum
    text_part = 2 * rec["score"] - float(amap.max())
    assert -1.0 <= text_part <= 1.0


def test_given_boxes_suppress_outside_and_force_position(images, tmp_path):
    _, paths = images
    base = tmp_path / "base"
    boxed = tmp_path / "boxed"
    common = [str(paths[1]), "--category", "pcb1", "--json", "--position", "top left"]
    p0 = _run(common + ["--grounding", "off", "--out", str(base)])
    p1 = _run(common + ["--boxes", "10,20,100,200", "--out", str(boxed)])
    assert p0.returncode == 0 and p1.returncode == 0, p1.stderr
    r0, r1 = json.loads(p0.stdout), json.loads(p1.stdout)
    assert r1["position"] == "top left"
    m0, m1 = np.load(r0["map"]), np.load(r1["map"])
    np.testing.assert_allclose(m1[20:200, 10:100], m0[20:200, 10:100], atol=1e-6)
    np.testing.assert_allclose(m1[300:, 300:], 0.7 * m0[300:, 300:], atol=1e-6)
    assert r0["score"] == pytest.approx(r1["score"], abs=1e-6)  # the score uses the map before suppression


def test_bad_inputs_give_clear_errors(images, tmp_path):
    d, paths = images
    proc = _run([str(paths[0]), "--category", "spaceship"])
    assert proc.returncode == 2 and "unknown category 'spaceship'" in proc.stderr and "bottle" in proc.stderr
    proc = _run([str(d / "broken.png"), str(paths[0]), "--category", "bottle", "--json", "--grounding", "off"])
    assert proc.returncode == 1
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert lines[0]["error"]["code"] in {"truncated_image", "not_an_image"} and "score" in lines[1]
    proc = _run([str(paths[0]), "--category", "bottle", "--boxes", "5,5,1,1"])
    assert proc.returncode == 2 and "x1 < x2" in proc.stderr


def test_production_profile_without_weights_names_what_is_missing(images, tmp_path):
    _, paths = images
    proc = subprocess.run([sys.executable, "-m", "service.cli", "inspect", str(paths[0]), "--category", "bottle"],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "FILO_PROFILE": "production", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "checkpoint" in proc.stderr and "--profile demo" in proc.stderr


def test_production_path_with_local_clip_file_and_project_checkpoint(images, tmp_path):
    """The real loading code (no demo shortcuts): a local open_clip state dict at native 224 px,
    resized to 518, plus a project checkpoint; results equal the same weights run in-process."""
    import open_clip
    import torch

    from models.checkpoint import save_checkpoint
    from models.clip_backbone import register_repo_configs
    from models.factory import ModelSpec, build_model
    from tests.conftest import random_heads

    _, paths = images
    register_repo_configs()
    torch.manual_seed(123)
    native = open_clip.create_model("FiLo-Tiny-CLIP")
    assert native.visual.positional_embedding.shape[0] == 1 + 16 * 16
    clip_file = tmp_path / "tiny_clip.bin"
    torch.save(native.state_dict(), clip_file)
    heads = random_heads(native, seed=4)
    ckpt = save_checkpoint(tmp_path / "filo.safetensors", heads,
                           {"clip_model": "FiLo-Tiny-CLIP", "image_size": 518, "tap_layout": "released"})
    out = tmp_path / "prod"
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "inspect", str(paths[0]), "--category", "cable", "--profile",
         "production", "--clip-model", "FiLo-Tiny-CLIP", "--clip-weights", str(clip_file), "--checkpoint",
         str(ckpt), "--grounding", "off", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "DEMO" not in proc.stderr
    rec = json.loads(proc.stdout)
    model, info = build_model(ModelSpec("FiLo-Tiny-CLIP", str(clip_file), 518, str(ckpt)))
    assert info["profile"] == "production" and info["tap_layout"] == "released"
    assert torch.equal(model.clip.visual.transformer.resblocks[0].mlp.c_fc.weight,
                       native.visual.transformer.resblocks[0].mlp.c_fc.weight)
    from descriptions import CategoryCatalog
    from service.core.imaging import read_image_file
    from service.core.types import InspectRequest
    from service.engine.pipeline import InspectionEngine

    engine = InspectionEngine(model, info, CategoryCatalog.load(), "cpu", None, False)
    res = engine.inspect_batch([InspectRequest(read_image_file(str(paths[0])), "cable", grounding=False)])[0]
    assert rec["score"] == pytest.approx(res.score, abs=1e-6)
    np.testing.assert_allclose(np.load(rec["map"]), res.anomaly_map, atol=1e-6)


def test_references_make_the_map_find_the_defect_and_are_reported(tmp_path):
    """`filo inspect --references` (the few-shot path a user runs): the JSON says how many were used, and
    on synthetic parts the fused maps separate defect pixels better than the zero-shot ones (pixel AUROC
    pooled over the category's test images, good ones included, as `filo eval` computes it)."""
    from sklearn.metrics import roc_auc_score

    from filo_lab.data import read_mask, resize_crop_mask
    from filo_lab.data.synth import generate

    root = tmp_path / "data"
    generate(root, ["washer"], n_train=4, n_good=2, n_defect=1, size=256, seed=23)
    tests = sorted((root / "washer" / "test").glob("*/*.png"))
    refs = root / "washer" / "train" / "good"
    common = [*map(str, tests), "--category", "washer", "--grounding", "off", "--json",
              "--descriptions", str(root / "descriptions.json")]
    zero = _run([*common, "--out", str(tmp_path / "zero")])
    few = _run([*common, "--out", str(tmp_path / "few"), "--references", str(refs)])
    assert zero.returncode == 0, zero.stderr
    assert few.returncode == 0, few.stderr
    zero_recs = [json.loads(line) for line in zero.stdout.splitlines()]
    few_recs = [json.loads(line) for line in few.stdout.splitlines()]
    assert "references" not in zero_recs[0]  # zero-shot output keeps its exact shape
    assert all(r["references"] == 4 for r in few_recs) and "references: 4 image(s)" in few.stderr

    def mask_of(img):
        if img.parent.name == "good":
            return np.zeros(518 * 518, np.uint8)
        return resize_crop_mask(read_mask(root / "washer" / "ground_truth" / img.parent.name / f"{img.stem}_mask.png"),
                                518).ravel()

    masks = np.concatenate([mask_of(img) for img in tests])
    auroc = {name: roc_auc_score(masks, np.concatenate([np.load(r["map"]).ravel() for r in recs]))
             for name, recs in (("zero", zero_recs), ("few", few_recs))}
    assert auroc["few"] > auroc["zero"] + 0.08, auroc  # measured: 0.826 -> 0.961
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = _run([str(tests[0]), "--category", "washer", "--descriptions", str(root / "descriptions.json"),
                "--references", str(empty)])
    assert bad.returncode == 2 and "no reference images" in bad.stderr
