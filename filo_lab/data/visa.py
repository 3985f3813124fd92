"""The VisA layout, as indexed by its own split file.

    <root>/split_csv/1cls.csv   columns: object, split, label, image, mask
        label is "normal" or "anomaly"; image and mask are paths relative to <root>;
        mask is empty for normal images.

VisA has no defect types; anomalous samples get defect_type "anomaly", normal ones "good".
"""

from __future__ import annotations

import csv
from pathlib import Path

from filo_lab.data.samples import GOOD, DatasetError, Sample, category_name, require_samples, select_categories

SPLIT_FILE = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}


def read(root: Path, categories: list[str] | None, split: str) -> list[Sample]:
    """Samples of the chosen categories listed in VisA's 1cls.csv."""
    rows = _read_rows(root / SPLIT_FILE)
    found: dict[str, list[tuple[int, dict[str, str]]]] = {}
    for line, row in rows:
        found.setdefault(category_name(row["object"].strip()), []).append((line, row))
    samples: list[Sample] = []
    for name in select_categories(found, categories, root):
        chosen = [
            _sample(root, name, line, row) for line, row in found[name] if row["split"].strip() == split
        ]
        samples += require_samples(chosen, name, root / SPLIT_FILE, split)
    return samples


def _read_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise DatasetError(f"VisA split file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{path} lacks the column(s) {', '.join(missing)}")
            return [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read the VisA split file {path}: {exc}") from exc


def _sample(root: Path, name: str, line: int, row: dict[str, str]) -> Sample:
    where = f"{root / SPLIT_FILE}:{line}"
    label = LABELS.get((row["label"] or "").strip())
    if label is None:
        raise DatasetError(f"{where}: label must be 'normal' or 'anomaly', not {row['label']!r}")
    image = root / (row["image"] or "").strip()
    if not image.is_file():
        raise DatasetError(f"{where}: image file not found: {image}")
    if label == 0:
        return Sample(image, None, name, 0, GOOD)
    mask_field = (row["mask"] or "").strip()
    mask = root / mask_field
    if not mask_field or not mask.is_file():
        raise DatasetError(f"{where}: missing mask for anomalous image {image}: expected {mask}")
    return Sample(image, mask, name, 1, "anomaly")
