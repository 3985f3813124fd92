"""What every dataset reader makes and checks: `Sample`, `DatasetError` and the rules the readers share.

A module of its own so that the readers (`mvtec`, `visa`, `folder`) and the package that dispatches to them
(`filo_lab.data.read_dataset`) both import it, and neither imports the other back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GOOD = "good"  # defect_type of normal images, in every layout


class DatasetError(ValueError):
    """A dataset that cannot be read as asked; the message names the offending path."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and where its ground truth lies."""

    image_path: Path
    mask_path: Path | None  # None: a normal image, or an anomalous one whose mask is unknown
    category: str
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal images


def category_name(folder: str) -> str:
    """Category name of a dataset folder, as the released code spells it ("metal_nut" -> "metal nut")."""
    return folder.replace("_", " ")


def select_categories(found: dict[str, object], requested: list[str] | None, root: Path) -> list[str]:
    """The requested category names (all when None), in name order; unknown ones are an error."""
    if not found:
        raise DatasetError(f"no category found under {root}")
    if requested is None:
        return sorted(found)
    chosen = []
    for name in requested:
        canonical = category_name(name.strip())
        if canonical not in found:
            raise DatasetError(f"unknown category {name!r} in {root}; known: {', '.join(sorted(found))}")
        chosen.append(canonical)
    return sorted(set(chosen))


def require_samples(samples: list[Sample], category: str, where: Path, split: str) -> list[Sample]:
    """An empty category is an error: it would silently vanish from the metrics."""
    if not samples:
        raise DatasetError(f"category {category!r} has no {split} images under {where}")
    return samples

