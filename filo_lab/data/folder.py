"""A plain folder layout for users' own data.

    <root>/<category>/good/*                       normal images
    <root>/<category>/<defect>/*                   anomalous images, one folder per defect type
    <root>/<category>/masks/<defect>/<stem>.png    optional ground truth (also <stem>_mask.png)

Masks are all or nothing per category: when <category>/masks/ exists, every anomalous image needs
its mask (a missing one is an error); without it the masks are unknown, `Sample.mask_path` is None,
and `load_sample` returns no mask for anomalous images (pixel metrics are then undefined).
The layout has one split only, "test" (it is what `filo eval` reads).
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

MASKS = "masks"


def read(root: Path, categories: list[str] | None, split: str) -> list[Sample]:
    """Samples of the chosen categories of a folder tree."""
    if split != "test":
        raise DatasetError(f"the folder layout has only a 'test' split, not {split!r}: {root}")
    found = {category_name(child.name): child for child in sorted(root.iterdir()) if _is_category(child)}
    samples: list[Sample] = []
    for name in select_categories(found, categories, root):
        samples += _read_category(name, found[name])
    return samples


def _is_category(folder: Path) -> bool:
    return (
        folder.is_dir()
        and not folder.name.startswith(".")
        and any(child.is_dir() and child.name != MASKS for child in folder.iterdir())
    )


def _read_category(name: str, folder: Path) -> list[Sample]:
    masks = folder / MASKS
    samples = []
    for defect in sorted(child for child in folder.iterdir() if child.is_dir() and child.name != MASKS):
        for path in list_images(defect):
            if defect.name == GOOD:
                samples.append(Sample(path, None, name, 0, GOOD))
            else:
                mask = _mask_of(masks, defect.name, path) if masks.is_dir() else None
                samples.append(Sample(path, mask, name, 1, defect.name))
    return require_samples(samples, name, folder, "test")


def _mask_of(masks: Path, defect: str, image: Path) -> Path:
    for candidate in (masks / defect / f"{image.stem}.png", masks / defect / f"{image.stem}_mask.png"):
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"missing mask for anomalous image {image}: expected {masks / defect / (image.stem + '.png')}"
    )
