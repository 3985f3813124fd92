"""filo_lab.data: the three layouts, their errors, and the frame geometry."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filo_lab.data import (
    DatasetError,
    Sample,
    detect_layout,
    load_sample,
    read_dataset,
    resize_crop_geometry,
    resize_crop_image,
    resize_crop_mask,
)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _image(h: int = 24, w: int = 32, value: int = 100) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def _mask(h: int = 24, w: int = 32, on: int = 255) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[5:10, 6:12] = on
    return mask


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    root = tmp_path / "mvtec"
    for category in ("metal_nut", "bottle"):
        _png(root / category / "train" / "good" / "000.png", _image())
        _png(root / category / "test" / "good" / "000.png", _image())
        for defect in ("scratch", "bent"):
            for stem in ("000", "001"):
                _png(root / category / "test" / defect / f"{stem}.png", _image(value=200))
                _png(root / category / "ground_truth" / defect / f"{stem}_mask.png", _mask())
    (root / "license.txt").write_text("not a category")
    return root


@pytest.fixture
def visa(tmp_path: Path) -> Path:
    root = tmp_path / "visa"
    rows = [("object", "split", "label", "image", "mask")]
    for category in ("pipe_fryum", "candle"):
        base = f"{category}/Data"
        _png(root / base / "Images" / "Normal" / "0000.JPG", _image())
        _png(root / base / "Images" / "Anomaly" / "000.JPG", _image(value=200))
        _png(root / base / "Masks" / "Anomaly" / "000.png", _mask(on=1))
        rows.append((category, "train", "normal", f"{base}/Images/Normal/0000.JPG", ""))
        rows.append((category, "test", "normal", f"{base}/Images/Normal/0000.JPG", ""))
        rows.append(
            (category, "test", "anomaly", f"{base}/Images/Anomaly/000.JPG", f"{base}/Masks/Anomaly/000.png")
        )
    _write_csv(root, rows)
    return root


def _write_csv(root: Path, rows: list[tuple[str, ...]]) -> None:
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "mine"
    _png(root / "gear_box" / "good" / "a.png", _image())
    _png(root / "gear_box" / "dent" / "b.jpg", _image(value=200))
    _png(root / "gear_box" / "masks" / "dent" / "b.png", _mask())
    _png(root / "plate" / "good" / "a.png", _image())
    _png(root / "plate" / "rust" / "c.png", _image(value=200))
    return root


# ----------------------------------------------------------------------------- MVTec AD


def test_mvtec_test_split(mvtec: Path):
    samples = read_dataset(mvtec)
    assert detect_layout(mvtec) == "mvtec"
    assert [s.category for s in samples].count("metal nut") == 5
    assert {s.category for s in samples} == {"bottle", "metal nut"}
    bent = next(s for s in samples if s.defect_type == "bent" and s.category == "metal nut")
    assert (
        bent.label == 1 and bent.mask_path == mvtec / "metal_nut" / "ground_truth" / "bent" / "000_mask.png"
    )
    good = next(s for s in samples if s.defect_type == "good")
    assert good.label == 0 and good.mask_path is None


def test_mvtec_train_split_and_category_spellings(mvtec: Path):
    samples = read_dataset(mvtec, layout="mvtec", categories=["metal_nut"], split="train")
    assert samples == [
        Sample(mvtec / "metal_nut" / "train" / "good" / "000.png", None, "metal nut", 0, "good")
    ]
    assert read_dataset(mvtec, categories=["metal nut"]) == read_dataset(mvtec, categories=["metal_nut"])
    assert read_dataset(mvtec, categories="bottle,metal_nut") == read_dataset(mvtec)


def test_mvtec_missing_mask(mvtec: Path):
    missing = mvtec / "bottle" / "ground_truth" / "bent" / "001_mask.png"
    missing.unlink()
    with pytest.raises(DatasetError, match="missing mask.*001_mask.png"):
        read_dataset(mvtec)


def test_unknown_category_lists_known_ones(mvtec: Path):
    with pytest.raises(DatasetError, match=r"unknown category 'cable'.*known: bottle, metal nut"):
        read_dataset(mvtec, categories=["cable"])


def test_empty_category(mvtec: Path):
    for path in (mvtec / "bottle" / "test").rglob("*.png"):
        path.unlink()
    with pytest.raises(DatasetError, match="'bottle' has no test images"):
        read_dataset(mvtec)


# ----------------------------------------------------------------------------- VisA


def test_visa(visa: Path):
    samples = read_dataset(visa)
    assert detect_layout(visa) == "visa"
    assert {s.category for s in samples} == {"candle", "pipe fryum"}
    assert len(samples) == 4 and len(read_dataset(visa, split="train")) == 2
    anomaly = next(s for s in samples if s.label == 1 and s.category == "pipe fryum")
    assert anomaly.defect_type == "anomaly" and anomaly.mask_path.is_file()
    _, mask = load_sample(anomaly)
    assert mask.max() == 1 and mask.sum() == 30  # a 0/1 mask is binarised at > 0


def test_visa_errors(visa: Path):
    (visa / "candle" / "Data" / "Masks" / "Anomaly" / "000.png").unlink()
    with pytest.raises(DatasetError, match=r"1cls.csv:\d+: missing mask"):
        read_dataset(visa)
    assert len(read_dataset(visa, categories=["pipe_fryum"])) == 2
    _write_csv(visa, [("object", "split", "label", "image"), ("candle", "test", "normal", "x.png")])
    with pytest.raises(DatasetError, match="lacks the column.*mask"):
        read_dataset(visa)
    _write_csv(visa, [("object", "split", "label", "image", "mask"), ("candle", "test", "bad", "x", "")])
    with pytest.raises(DatasetError, match="label must be"):
        read_dataset(visa)


# ----------------------------------------------------------------------------- folder


def test_folder_layout(folder: Path):
    samples = read_dataset(folder)
    assert detect_layout(folder) == "folder"
    by_path = {s.image_path.name: s for s in samples}
    assert by_path["b.jpg"] == Sample(
        folder / "gear_box" / "dent" / "b.jpg",
        folder / "gear_box" / "masks" / "dent" / "b.png",
        "gear box",
        1,
        "dent",
    )
    rust = by_path["c.png"]
    assert rust.mask_path is None and rust.label == 1
    image, mask = load_sample(rust)
    assert image.shape == (24, 32, 3) and mask is None  # ground truth unknown
    _, good_mask = load_sample(by_path["a.png"])
    assert good_mask.shape == (24, 32) and good_mask.max() == 0


def test_folder_masks_are_all_or_nothing(folder: Path):
    (folder / "gear_box" / "masks" / "dent" / "b.png").unlink()
    with pytest.raises(DatasetError, match="missing mask.*b.jpg"):
        read_dataset(folder, layout="folder")
    with pytest.raises(DatasetError, match="only a 'test' split"):
        read_dataset(folder, categories=["plate"], split="train")


# ----------------------------------------------------------------------------- general errors


def test_root_and_layout_errors(tmp_path: Path):
    with pytest.raises(DatasetError, match="not found.*nowhere"):
        read_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="unknown layout 'coco'"):
        read_dataset(tmp_path, layout="coco")
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError, match="cannot tell the layout"):
        read_dataset(tmp_path)
    with pytest.raises(DatasetError, match="split file not found"):
        read_dataset(tmp_path, layout="visa")


def test_corrupt_image_is_reported_when_loaded(mvtec: Path):
    sample = read_dataset(mvtec, categories=["bottle"])[0]
    sample.image_path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DatasetError, match=f"cannot decode image.*{sample.image_path.name}"):
        load_sample(sample)
    truncated = read_dataset(mvtec, categories=["bottle"])[1]
    truncated.image_path.write_bytes(truncated.image_path.read_bytes()[:60])
    with pytest.raises(DatasetError, match="cannot decode image"):
        load_sample(truncated)


def test_mask_of_another_size(mvtec: Path):
    sample = next(s for s in read_dataset(mvtec) if s.label == 1)
    _png(sample.mask_path, _mask(h=10, w=10))
    with pytest.raises(DatasetError, match="mask .* is 10x10 but its image"):
        load_sample(sample)


# ----------------------------------------------------------------------------- frame geometry


def test_geometry_matches_torchvision():
    torchvision = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    for h, w in ((37, 53), (64, 48), (30, 30), (101, 50)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = (rng.random((h, w)) > 0.7).astype(np.uint8)
        for size in (16, 29):
            pipeline = torchvision.Compose(
                [
                    torchvision.Resize(size, interpolation=torchvision.InterpolationMode.BICUBIC),
                    torchvision.CenterCrop(size),
                ]
            )
            expected = np.asarray(pipeline(Image.fromarray(image)))
            np.testing.assert_array_equal(resize_crop_image(image, size), expected)
            nearest = torchvision.Compose(
                [
                    torchvision.Resize(size, interpolation=torchvision.InterpolationMode.NEAREST),
                    torchvision.CenterCrop(size),
                ]
            )
            expected_mask = np.asarray(nearest(Image.fromarray(mask * 255))) > 127
            np.testing.assert_array_equal(resize_crop_mask(mask, size), expected_mask.astype(np.uint8))


def test_mask_follows_the_image_and_stays_binary(mvtec: Path):
    h, w, size = 60, 90, 30
    image = np.zeros((h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    image[20:40, 40:60] = 255
    mask[20:40, 40:60] = 1
    assert resize_crop_geometry(h, w, size) == (30, 45, 0, 8)
    frame_mask = resize_crop_mask(mask, size, interpolation="bilinear")
    frame_image = resize_crop_image(image, size)
    assert set(np.unique(frame_mask)) == {0, 1}
    np.testing.assert_array_equal(frame_mask, (frame_image[..., 0] > 127).astype(np.uint8))
    sample = next(s for s in read_dataset(mvtec) if s.label == 1)
    frame_image, frame_mask = load_sample(sample, size=16)
    assert frame_image.shape == (16, 16, 3) and frame_mask.shape == (16, 16) and frame_mask.max() == 1
    with pytest.raises(ValueError, match="interpolation"):
        resize_crop_mask(mask, size, interpolation="cubic")


def test_mask_geometry_squash_differs_from_crop_on_non_square_images():
    from filo_lab.data import resize_crop_mask

    mask = np.zeros((100, 200), np.uint8)
    mask[:, :20] = 1  # a stripe at the left edge: cropped away by the center crop, kept by squashing
    crop = resize_crop_mask(mask, 50, "nearest", "crop")
    squash = resize_crop_mask(mask, 50, "nearest", "squash")
    assert crop.sum() == 0
    assert squash[:, :5].all() and squash[:, 6:].sum() == 0
    square = np.zeros((80, 80), np.uint8)
    square[10:30, 40:70] = 1
    np.testing.assert_array_equal(resize_crop_mask(square, 40, "nearest", "crop"),
                                  resize_crop_mask(square, 40, "nearest", "squash"))
