"""The MVTec AD layout.

<root>/<category>/train/good/*.png
<root>/<category>/test/<defect>/*.png                  (defect "good" for normal images)
<root>/<category>/ground_truth/<defect>/<stem>_mask.png (every anomalous test image has one)
"""

from __future__ import annotations

from pathlib import Path

from filo_lab.data.samples import (
    GOOD,
    DatasetError,
    Sample,
    category_name,
    require_samples,
    select_categories,
)
from service.core.imaging import list_images


def read(root: Path, categories: list[str] | None, split: str) -> list[Sample]:
    """Samples of the chosen categories of an MVTec AD tree."""
    found = {
        category_name(child.name): child
        for child in sorted(root.iterdir())
        if child.is_dir() and ((child / "test").is_dir() or (child / "train").is_dir())
    }
    samples: list[Sample] = []
    for name in select_categories(found, categories, root):
        read_category = _read_test if split == "test" else _read_train
        samples += read_category(name, found[name])
    return samples


def _read_train(name: str, folder: Path) -> list[Sample]:
    good = folder / "train" / GOOD
    if not good.is_dir():
        raise DatasetError(f"category {name!r} has no train/good folder: {good}")
    samples = [Sample(path, None, name, 0, GOOD) for path in list_images(good)]
    return require_samples(samples, name, good, "train")


def _read_test(name: str, folder: Path) -> list[Sample]:
    test = folder / "test"
    if not test.is_dir():
        raise DatasetError(f"category {name!r} has no test folder: {test}")
    samples = []
    for defect in sorted(child for child in test.iterdir() if child.is_dir()):
        for path in list_images(defect):
            if defect.name == GOOD:
                samples.append(Sample(path, None, name, 0, GOOD))
            else:
                samples.append(Sample(path, _mask_of(folder, defect.name, path), name, 1, defect.name))
    return require_samples(samples, name, test, "test")


def _mask_of(folder: Path, defect: str, image: Path) -> Path:
    mask = folder / "ground_truth" / defect / f"{image.stem}_mask.png"
    if not mask.is_file():
        raise DatasetError(f"missing mask for anomalous image {image}: expected {mask}")
    return mask
