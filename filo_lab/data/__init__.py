"""Dataset readers for evaluation and training: MVTec AD, VisA, and a plain folder layout.

`read_dataset` only lists files (cheap, and it fails early on a broken layout: a missing mask, an
unknown category); `load_sample` decodes one sample when it is needed, so a corrupt image is reported
with its path at the moment it is read. Every problem is a `DatasetError` naming the path involved.

Images are decoded with Pillow, as the released FiLo code does, because JPEG decoders differ in their
last bits (VisA is JPEG). Category names follow the released code: folder underscores become spaces
("metal_nut" -> "metal nut"); a request may use either spelling.

Frame geometry (`resize_crop_image`, `resize_crop_mask`) is open_clip's preprocessing: resize the
shorter side to S (the longer one to int(S * long / short)), then center-crop S x S, the crop offset
being int(round((side - S) / 2)). The mask goes through the same geometry so that its pixels line up
with the anomaly map's, then is binarised at 0.5 (spec section 9).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from descriptions import CategoryCatalog, UnknownCategoryError
from filo_lab.data.samples import GOOD, DatasetError, Sample
from models.frame import center_crop_offsets, resized_size

LAYOUTS = ("auto", "mvtec", "visa", "folder")
SPLITS = ("train", "test")


def read_dataset(
    root: str | Path,
    layout: str = "auto",
    categories: list[str] | str | None = None,
    split: str = "test",
) -> list[Sample]:
    """List the samples of a dataset, category by category in name order.

    layout: "mvtec", "visa", "folder", or "auto" (guessed from the files). categories: names to keep
    (either spelling, a list or one comma-separated string; None keeps all). split: "test" or "train".
    """
    if isinstance(categories, str):
        categories = [name for name in categories.split(",") if name.strip()]
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root not found (or not a folder): {root}")
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r} for {root}; expected one of {', '.join(LAYOUTS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for {root}; expected one of {', '.join(SPLITS)}")
    if layout == "auto":
        layout = detect_layout(root)
    from filo_lab.data import folder, mvtec, visa

    reader = {"mvtec": mvtec.read, "visa": visa.read, "folder": folder.read}[layout]
    return reader(root, categories, split)


def detect_layout(root: Path) -> str:
    """Guess a dataset's layout from the files at its root."""
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    children = [child for child in sorted(root.iterdir()) if child.is_dir()]
    if any((child / "test").is_dir() for child in children):
        return "mvtec"
    if any((child / GOOD).is_dir() for child in children):
        return "folder"
    raise DatasetError(
        f"cannot tell the layout of {root}: expected split_csv/1cls.csv (VisA), "
        "<category>/test/ (MVTec AD) or <category>/good/ (folder)"
    )


# ----------------------------------------------------------------------------- loading


def load_sample(sample: Sample, size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode a sample: (image uint8 HxWx3 RGB, mask uint8 HxW of 0/1).

    The mask is zeros for a normal image and None only when an anomalous image's ground truth is
    unknown (a folder dataset without masks). With `size`, both are brought to the S x S model frame
    by `resize_crop_image` / `resize_crop_mask`.
    """
    image = read_image(sample.image_path)
    if sample.mask_path is not None:
        mask = read_mask(sample.mask_path)
        if mask.shape != image.shape[:2]:
            raise DatasetError(
                f"mask {sample.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{sample.image_path} is {image.shape[1]}x{image.shape[0]}"
            )
    elif sample.label == 0:
        mask = np.zeros(image.shape[:2], dtype=np.uint8)
    else:
        mask = None
    if size is not None:
        image = resize_crop_image(image, size)
        mask = None if mask is None else resize_crop_mask(mask, size)
    return image, mask


def _open(path: Path) -> Image.Image:
    """Open and fully decode an image file, turning every failure into a DatasetError."""
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here, not later
            return opened.copy()
    except FileNotFoundError as exc:
        raise DatasetError(f"image file not found: {path}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"cannot decode image (corrupt or not an image): {path}: {exc}") from exc


def read_image(path: Path) -> np.ndarray:
    """An image file as uint8 HxWx3 RGB."""
    return np.asarray(_open(Path(path)).convert("RGB"), dtype=np.uint8)


def read_mask(path: Path) -> np.ndarray:
    """A mask file as uint8 HxW 0/1: every non-zero pixel (or palette index) is anomalous."""
    image = _open(Path(path))
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGB") if image.mode == "RGBA" else image.convert("L")
    array = np.asarray(image)
    if array.ndim == 3:
        array = array.max(axis=2)
    return (array > 0).astype(np.uint8)


# ----------------------------------------------------------------------------- frame geometry


def resize_crop_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, crop top, crop left) of open_clip's resize + center crop."""
    if size <= 0:
        raise ValueError(f"frame size must be positive, not {size}")
    new_h, new_w = resized_size(height, width, size)
    top, left = center_crop_offsets(new_h, new_w, size)
    return new_h, new_w, top, left


def _resize_crop(image: Image.Image, size: int, resample: int) -> Image.Image:
    new_h, new_w, top, left = resize_crop_geometry(image.height, image.width, size)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample=resample)
    return image.crop((left, top, left + size, top + size))


def resize_crop_image(image: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 -> SxSx3: bicubic resize of the shorter side to S, then center crop (open_clip)."""
    return np.asarray(_resize_crop(Image.fromarray(image), size, Image.Resampling.BICUBIC))


MASK_GEOMETRIES = ("crop", "squash")
MASK_INTERPOLATIONS = ("bilinear", "nearest")
DEFAULT_MASK_INTERPOLATION = "bilinear"  # the released code: torchvision Resize (bilinear), then > 0.5


def resize_crop_mask(mask: np.ndarray, size: int, interpolation: str = "nearest",
                     geometry: str = "crop") -> np.ndarray:
    """HxW 0/1 mask -> SxS 0/1 mask, binarised at 0.5.

    geometry "crop" is the image's own resize + center crop, so mask and map line up; "squash"
    resizes to SxS ignoring the aspect ratio, which is what the released test script did to masks
    (its figures on non-square VisA images were computed that way; square images are unaffected).
    "nearest" keeps the mask's own pixels; "bilinear" averages them first (what the released code's
    torchvision Resize does to its mask before its `> 0.5`).
    """
    resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}.get(interpolation)
    if resample is None:
        raise ValueError(f"interpolation must be 'nearest' or 'bilinear', not {interpolation!r}")
    if geometry not in MASK_GEOMETRIES:
        raise ValueError(f"geometry must be one of {MASK_GEOMETRIES}, not {geometry!r}")
    scaled = Image.fromarray(((np.asarray(mask) > 0) * 255).astype(np.uint8))
    framed = _resize_crop(scaled, size, resample) if geometry == "crop" else scaled.resize((size, size), resample)
    return (np.asarray(framed) > 127.5).astype(np.uint8)


def group_by_category(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    """Samples per category, in the order the reader listed them."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.category, []).append(s)
    return groups


def limit_per_category(samples: Sequence[Sample], max_images: int | None) -> list[Sample]:
    """At most `max_images` samples of each category, evenly spaced through its (sorted) list.

    Readers list a category's normal images and each defect type in turn; taking the first N would
    keep only normal images (and undefined metrics), evenly spaced indices keep every kind.
    """
    if max_images is None:
        return list(samples)
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, not {max_images}")
    chosen: list[Sample] = []
    for group in group_by_category(samples).values():
        if len(group) <= max_images:
            chosen += group
        else:
            idx = np.unique(np.round(np.linspace(0, len(group) - 1, max_images)).astype(int))
            chosen += [group[i] for i in idx]
    return chosen


def catalog_name(catalog: CategoryCatalog, dataset_name: str) -> str:
    """The catalog's spelling of a dataset category ("metal nut" or "metal_nut"); raises if neither."""
    for candidate in (dataset_name, dataset_name.replace(" ", "_"), dataset_name.replace("_", " ")):
        if candidate in catalog:
            return candidate
    raise UnknownCategoryError(dataset_name, catalog.names())
