"""filo_lab.data.synth and `filo synth`: layout, exact masks, determinism."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from filo_lab.data import load_sample, read_dataset, synth
from service.cli import synth_cmd

SMALL = {"n_train": 1, "n_good": 2, "n_defect": 2, "size": 64}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_layout_reads_back_as_mvtec(tmp_path: Path):
    summary = synth.generate(tmp_path, **SMALL)
    assert len(synth.CATEGORIES) >= 6 and set(summary["categories"]) == set(synth.CATEGORY_NAMES)
    samples = read_dataset(tmp_path)
    assert len(samples) == summary["images"] - len(synth.CATEGORIES)  # minus the train images
    assert summary["images"] == synth.planned_images(None, 1, 2, 2)
    kinds = {s.defect_type for s in samples}
    assert kinds == {"good", "scratch", "hole", "stain", "crack", "missing"}
    for sample in samples:
        image, mask = load_sample(sample)
        assert image.shape == (64, 64, 3)
        assert (mask.sum() > 0) == (sample.label == 1)
    assert len(read_dataset(tmp_path, split="train")) == len(synth.CATEGORIES)


def test_same_seed_same_bytes_and_subsets_agree(tmp_path: Path):
    first, second, other, subset = (tmp_path / name for name in ("a", "b", "c", "d"))
    synth.generate(first, **SMALL)
    synth.generate(second, **SMALL)
    synth.generate(other, seed=1, **SMALL)
    synth.generate(subset, categories=["wood", "pill"], **SMALL)
    assert _hashes(first) == _hashes(second)
    differing = {k for k, v in _hashes(other).items() if _hashes(first)[k] != v}
    assert len(differing) > 0.9 * len(_hashes(first)) - 1  # all images differ (descriptions do not)
    full = _hashes(first)
    assert all(full[k] == v for k, v in _hashes(subset).items() if k != "descriptions.json")


@pytest.mark.parametrize("spec", synth.CATEGORIES, ids=lambda s: s.name)
def test_defects_change_exactly_their_mask(spec: synth.CategorySpec):
    for index, kind in enumerate(spec.defects):
        rng = np.random.default_rng([3, index])
        clean, region, background = synth.render(spec, rng, (80, 64))
        assert clean.shape == (64, 80, 3) and clean.dtype == np.uint8
        damaged, mask = synth.apply_defect(clean, kind, rng, region, background)
        inside = mask.astype(bool)
        assert set(np.unique(mask)) == {0, 1} and inside.sum() >= 12
        assert not inside[~region].any()  # object defects stay on the object
        np.testing.assert_array_equal(damaged[~inside], clean[~inside])
        changed = np.any(damaged != clean, axis=2)[inside].mean()
        assert changed > 0.9, f"{spec.name}/{kind}: only {changed:.0%} of the mask changed"


def test_non_square_size_and_size_parsing(tmp_path: Path):
    synth.generate(tmp_path, categories=["bolt"], n_train=0, n_good=1, n_defect=1, size=(96, 48))
    image, mask = load_sample(read_dataset(tmp_path)[0])
    assert image.shape == (48, 96, 3) and mask.shape == (48, 96)
    assert synth.parse_size("320x200") == (320, 200) and synth.parse_size("128") == (128, 128)
    for bad in ("12", "axb", "10x10x10", (16, 300)):
        with pytest.raises(ValueError):
            synth.parse_size(bad)


def test_descriptions_file(tmp_path: Path):
    synth.generate(tmp_path, categories=["fabric", "washer"], n_train=0, n_good=0, n_defect=1, size=48)
    document = json.loads((tmp_path / "descriptions.json").read_text())
    assert document["format"] == "filo-descriptions/v1" and document["dataset"] == "synth"
    assert [c["name"] for c in document["categories"]] == ["fabric", "washer"]
    for category in document["categories"]:
        assert 4 <= len(category["descriptions"]) <= 8 and category["noun"]
    assert "missing piece" in document["categories"][1]["descriptions"]
    for spec in synth.CATEGORIES:
        assert 4 <= len(spec.descriptions) <= 8
    synth.generate(tmp_path, categories=["bolt"], n_train=0, n_good=0, n_defect=1, size=48)
    merged = json.loads((tmp_path / "descriptions.json").read_text())
    assert [c["name"] for c in merged["categories"]] == ["fabric", "washer", "bolt"]


def test_existing_output_needs_overwrite(tmp_path: Path):
    synth.generate(tmp_path, categories=["tiles"], n_train=0, n_good=1, n_defect=0, size=32)
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="tiles"):
        synth.generate(tmp_path, categories=["tiles"], n_train=0, n_good=1, n_defect=0, size=32)
    synth.generate(tmp_path, categories=["tiles"], n_train=0, n_good=2, n_defect=0, size=32, overwrite=True)
    assert len(list((tmp_path / "tiles" / "test" / "good").iterdir())) == 2
    assert (tmp_path / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="unknown synth categories"):
        synth.generate(tmp_path / "x", categories=["carpet"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="filo")
    synth_cmd.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli(tmp_path: Path, capsys):
    out = tmp_path / "data"
    args = _parser().parse_args(
        [
            "synth",
            str(out),
            "--categories",
            "pill,metal",
            "--n-train",
            "0",
            "--n-good",
            "1",
            "--n-defect",
            "1",
            "--size",
            "64x48",
            "--seed",
            "5",
        ]
    )
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "wrote 10 images (64x48, seed 5)" in captured.out and "pill" in captured.out
    assert "synth" in captured.err  # the progress bar goes to stderr
    assert sorted(p.name for p in out.iterdir()) == ["descriptions.json", "metal", "pill"]
    again = _parser().parse_args(["synth", str(out), "--categories", "pill"])
    assert again.func(again) == 2 and "already exists" in capsys.readouterr().err
    bad = _parser().parse_args(["synth", str(out), "--size", "tiny"])
    assert bad.func(bad) == 2
