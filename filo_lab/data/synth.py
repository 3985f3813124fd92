"""A procedural anomaly-detection dataset in the MVTec AD layout, for tests and demos.

The real benchmarks (MVTec AD, VisA) cannot be shipped or downloaded here, yet every reader, metric
and command needs data with exact ground truth. This module draws it: textured surfaces (fabric,
wood, metal, tiles) and simple objects on a background (washer, pill, bolt), each with defects of
several kinds (scratch, hole, stain, crack, missing piece) whose masks are exact by construction:
a defect only ever changes the pixels of its mask, and nothing is drawn after it.

Everything is seeded. Each image has its own generator seeded by (seed, category, split, index), so
the same arguments give byte-identical files, and a category's images do not depend on which other
categories are generated. Only numpy and OpenCV are used.

Output (see `generate`):
    OUT/<category>/train/good/000.png
    OUT/<category>/test/good/000.png
    OUT/<category>/test/<defect>/000.png
    OUT/<category>/ground_truth/<defect>/000_mask.png   (0/255)
    OUT/descriptions.json                               (format filo-descriptions/v1)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

DESCRIPTIONS_FORMAT = "filo-descriptions/v1"
DEFAULT_SIZE = 256
MIN_SIZE = 32
_MIN_DEFECT_PIXELS = 12

# Fine-grained descriptions per defect kind: the first of each is always used, the others fill up
# to eight per category.
KIND_DESCRIPTIONS = {
    "scratch": ("thin scratch", "bright scratch line"),
    "hole": ("round hole", "dark hole"),
    "stain": ("colour stain", "dark stain"),
    "crack": ("crack", "thin dark crack"),
    "missing": ("missing piece", "broken edge"),
}


@dataclass(frozen=True)
class CategorySpec:
    name: str
    noun: str
    kind: str  # "texture" or "object"
    defects: tuple[str, ...]

    @property
    def descriptions(self) -> list[str]:
        """4 to 8 fine-grained descriptions matching this category's defect kinds."""
        first = [KIND_DESCRIPTIONS[d][0] for d in self.defects]
        rest = [text for d in self.defects for text in KIND_DESCRIPTIONS[d][1:]]
        return (first + rest)[:8]


# The order is part of the seeding: append new categories, never reorder.
CATEGORIES: tuple[CategorySpec, ...] = (
    CategorySpec("fabric", "fabric", "texture", ("scratch", "hole", "stain", "crack")),
    CategorySpec("wood", "wood", "texture", ("scratch", "hole", "stain", "crack")),
    CategorySpec("metal", "metal plate", "texture", ("scratch", "hole", "stain", "crack")),
    CategorySpec("tiles", "tiles", "texture", ("scratch", "hole", "stain", "crack")),
    CategorySpec("washer", "washer", "object", ("scratch", "stain", "crack", "missing")),
    CategorySpec("pill", "pill", "object", ("hole", "stain", "crack", "missing")),
    CategorySpec("bolt", "bolt", "object", ("scratch", "stain", "crack", "missing")),
)
CATEGORY_NAMES = tuple(spec.name for spec in CATEGORIES)
_SPLIT_CODES = {"train": 0, "good": 1}  # test defects use 2 + their index in KIND_DESCRIPTIONS


# ----------------------------------------------------------------------------- public API


def generate(
    out_dir: str | Path,
    categories: list[str] | None = None,
    n_train: int = 10,
    n_good: int = 8,
    n_defect: int = 4,
    size: int | tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
    overwrite: bool = False,
    on_image: Callable[[Path], None] | None = None,
) -> dict:
    """Write the dataset and its descriptions file; return a summary of what was written.

    size: S for S x S images or (width, height). Existing category folders are an error unless
    `overwrite`, which replaces exactly the generated categories. `on_image` is called after each
    image file is written (progress bars).
    """
    specs = select(categories)
    width, height = parse_size(size)
    for count, what in ((n_train, "n_train"), (n_good, "n_good"), (n_defect, "n_defect")):
        if count < 0:
            raise ValueError(f"{what} must be >= 0, not {count}")
    out = Path(out_dir)
    _prepare_output(out, specs, overwrite)
    summary = {"root": str(out), "seed": seed, "size": [width, height], "categories": {}, "images": 0}
    for spec in specs:
        counts = _write_category(out, spec, (width, height), seed, (n_train, n_good, n_defect), on_image)
        summary["categories"][spec.name] = counts
        summary["images"] += counts["train"] + counts["test_good"] + sum(counts["test_defects"].values())
    summary["descriptions"] = str(write_descriptions(out / "descriptions.json", specs))
    return summary


def planned_images(categories: list[str] | None, n_train: int, n_good: int, n_defect: int) -> int:
    """How many images `generate` will write (for a progress bar's total)."""
    return sum(n_train + n_good + n_defect * len(spec.defects) for spec in select(categories))


def select(categories: list[str] | None) -> list[CategorySpec]:
    """The specs of the named categories (all when None), in the canonical order."""
    if categories is None:
        return list(CATEGORIES)
    unknown = [name for name in categories if name not in CATEGORY_NAMES]
    if unknown:
        raise ValueError(f"unknown synth categories {unknown}; known: {', '.join(CATEGORY_NAMES)}")
    return [spec for spec in CATEGORIES if spec.name in categories]


def parse_size(size: int | str | tuple[int, int]) -> tuple[int, int]:
    """(width, height) from S, "S", "WxH" or (W, H); both sides at least 32."""
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size must be S or WxH, not {size!r}")
        size = int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(width, height) < MIN_SIZE:
        raise ValueError(f"image sides must be at least {MIN_SIZE} pixels, not {width}x{height}")
    return width, height


def write_descriptions(path: Path, specs: list[CategorySpec]) -> Path:
    """The categories' nouns and fine-grained descriptions, in the project's descriptions format.

    Entries of an earlier synth descriptions file for other categories are kept, so generating
    categories one at a time into one folder describes them all.
    """
    entries = {entry["name"]: entry for entry in _earlier_entries(path)}
    for spec in specs:
        entries[spec.name] = {"name": spec.name, "noun": spec.noun, "descriptions": spec.descriptions}
    order = {name: i for i, name in enumerate(CATEGORY_NAMES)}
    document = {
        "format": DESCRIPTIONS_FORMAT,
        "dataset": "synth",
        "categories": sorted(entries.values(), key=lambda e: (order.get(e["name"], len(order)), e["name"])),
    }
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return path


def _earlier_entries(path: Path) -> list[dict]:
    """The categories of an existing synth descriptions file (none if absent or not ours)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(document, dict) or document.get("format") != DESCRIPTIONS_FORMAT:
        return []
    if document.get("dataset") != "synth":
        return []
    return [e for e in document.get("categories", []) if isinstance(e, dict) and "name" in e]


def render(spec: CategorySpec, rng: np.random.Generator, size: tuple[int, int]):
    """A defect-free image: (image uint8 HxWx3 RGB, where defects may go (bool HxW), background or None).

    For objects the region is the object and the background is the image without it (what a
    missing piece reveals); textures may be damaged anywhere and have no background.
    """
    return _RENDERERS[spec.name](rng, size[1], size[0])


def apply_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator, region: np.ndarray, background: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of `kind` inside `region`: (new image, mask uint8 0/1 of exactly the drawn pixels)."""
    draw = _DEFECTS[kind]
    for _ in range(50):  # a defect that misses the region (rare) is drawn again elsewhere
        mask, paint = draw(rng, image, region, background)
        if mask.sum() >= _MIN_DEFECT_PIXELS:
            out = image.copy()
            out[mask] = paint[mask]
            return out, mask.astype(np.uint8)
    raise RuntimeError(f"could not place a {kind} defect in a region of {int(region.sum())} pixels")


# ----------------------------------------------------------------------------- writing


def _prepare_output(out: Path, specs: list[CategorySpec], overwrite: bool) -> None:
    existing = [out / spec.name for spec in specs if (out / spec.name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists (pass overwrite to replace it)")
    for path in existing:
        shutil.rmtree(path)
    out.mkdir(parents=True, exist_ok=True)


def _write_category(out, spec, size, seed, counts, on_image) -> dict:
    n_train, n_good, n_defect = counts
    index = CATEGORY_NAMES.index(spec.name)
    folder = out / spec.name
    for i in range(n_train):
        _write_png(
            folder / "train" / "good" / f"{i:03d}.png", _good(spec, seed, index, "train", i, size), on_image
        )
    for i in range(n_good):
        _write_png(
            folder / "test" / "good" / f"{i:03d}.png", _good(spec, seed, index, "good", i, size), on_image
        )
    for kind in spec.defects:
        for i in range(n_defect):
            image, mask = _defective(spec, seed, index, kind, i, size)
            _write_png(folder / "ground_truth" / kind / f"{i:03d}_mask.png", mask * 255, None)
            _write_png(folder / "test" / kind / f"{i:03d}.png", image, on_image)
    return {"train": n_train, "test_good": n_good, "test_defects": {kind: n_defect for kind in spec.defects}}


def _rng(seed: int, category: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, category, split, index])


def _good(spec, seed, category, split, i, size) -> np.ndarray:
    return render(spec, _rng(seed, category, _SPLIT_CODES[split], i), size)[0]


def _defective(spec, seed, category, kind, i, size) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(seed, category, 2 + list(KIND_DESCRIPTIONS).index(kind), i)
    image, region, background = render(spec, rng, size)
    return apply_defect(image, kind, rng, region, background)


def _write_png(path: Path, array: np.ndarray, on_image: Callable[[Path], None] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array.astype(np.uint8)
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise OSError(f"cannot encode {path}")
    path.write_bytes(encoded.tobytes())
    if on_image is not None:
        on_image(path)


# ----------------------------------------------------------------------------- drawing helpers


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:h, 0:w].astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise that varies over about `cell` pixels."""
    coarse = rng.standard_normal((h // cell + 3, w // cell + 3)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _colourise(value: np.ndarray, dark: tuple, light: tuple) -> np.ndarray:
    """Blend two RGB colours by `value` in [0, 1] into a uint8 image."""
    value = np.clip(value, 0, 1)[..., None]
    colour = np.array(dark, np.float32) * (1 - value) + np.array(light, np.float32) * value
    return np.clip(colour, 0, 255).astype(np.uint8)


def _grain(rng: np.random.Generator, h: int, w: int, amount: float) -> np.ndarray:
    return rng.normal(0, amount, (h, w)).astype(np.float32)


def _jitter(rng: np.random.Generator, colour: tuple, amount: float = 12) -> tuple:
    return tuple(float(c + rng.uniform(-amount, amount)) for c in colour)


# ----------------------------------------------------------------------------- textures


def _fabric(rng, h, w):
    y, x = _grid(h, w)
    period = rng.uniform(7, 10)
    x, y = x + rng.uniform(0, period), y + rng.uniform(0, period)
    over = (np.floor(x / period) + np.floor(y / period)) % 2 == 0  # warp over weft, checkerwise
    thread = np.where(over, np.cos(np.pi * (y % period) / period), np.cos(np.pi * (x % period) / period))
    value = 0.55 + 0.3 * np.abs(thread) * np.where(over, 1.0, 0.8) + _grain(rng, h, w, 0.04)
    image = _colourise(value, _jitter(rng, (30, 45, 90)), _jitter(rng, (120, 150, 210)))
    return image, np.ones((h, w), bool), None


def _wood(rng, h, w):
    y, x = _grid(h, w)
    period = rng.uniform(9, 16)
    warp = 10 * _smooth_noise(rng, h, w, 48) + 5 * np.sin(2 * np.pi * y / rng.uniform(0.6, 1.2) / h)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (x + warp) / period + rng.uniform(0, 6.3))
    value = 0.35 + 0.45 * rings**3 + 0.03 * _smooth_noise(rng, h, w, 6) + _grain(rng, h, w, 0.03)
    image = _colourise(value, _jitter(rng, (95, 55, 25)), _jitter(rng, (215, 165, 105)))
    return image, np.ones((h, w), bool), None


def _metal(rng, h, w):
    streaks = cv2.blur(rng.standard_normal((h, w)).astype(np.float32), (max(3, w // 4) | 1, 1))
    streaks = streaks / (streaks.std() + 1e-6)
    shade = np.linspace(0, 1, h, dtype=np.float32)[:, None] * rng.uniform(-0.1, 0.1)
    value = 0.55 + 0.08 * streaks + shade + _grain(rng, h, w, 0.02)
    image = _colourise(value, _jitter(rng, (60, 62, 66), 6), _jitter(rng, (215, 218, 222), 6))
    return image, np.ones((h, w), bool), None


def _tiles(rng, h, w):
    y, x = _grid(h, w)
    tile = rng.uniform(0.18, 0.26) * min(h, w)
    gx, gy = x + rng.uniform(0, tile), y + rng.uniform(0, tile)
    ix, iy = np.floor(gx / tile).astype(int), np.floor(gy / tile).astype(int)
    shades = rng.uniform(-0.06, 0.06, (iy.max() + 1, ix.max() + 1)).astype(np.float32)
    grout = (np.minimum(gx % tile, tile - gx % tile) < 1.6) | (np.minimum(gy % tile, tile - gy % tile) < 1.6)
    value = np.where(grout, 0.15, 0.72 + shades[iy, ix]) + _grain(rng, h, w, 0.02)
    image = _colourise(value, _jitter(rng, (70, 70, 80), 6), _jitter(rng, (235, 225, 205), 8))
    return image, np.ones((h, w), bool), None


# ----------------------------------------------------------------------------- objects


def _plain_background(rng, h, w, dark, light, cell=40):
    value = 0.5 + 0.15 * _smooth_noise(rng, h, w, cell) + _grain(rng, h, w, 0.02)
    return _colourise(value, _jitter(rng, dark, 8), _jitter(rng, light, 8))


def _place(rng, h, w) -> tuple[float, float, float]:
    """A jittered centre and the frame's short side."""
    short = min(h, w)
    return w / 2 + rng.uniform(-0.05, 0.05) * w, h / 2 + rng.uniform(-0.05, 0.05) * h, short


def _washer(rng, h, w):
    background = _plain_background(rng, h, w, (20, 22, 26), (90, 92, 98))
    cx, cy, short = _place(rng, h, w)
    y, x = _grid(h, w)
    radius = np.hypot(x - cx, y - cy)
    outer, inner = short * rng.uniform(0.32, 0.38), short * rng.uniform(0.13, 0.17)
    ring = (radius <= outer) & (radius >= inner)
    light = 0.55 + 0.25 * np.cos(np.arctan2(y - cy, x - cx) - rng.uniform(0, 6.3)) + _grain(rng, h, w, 0.03)
    metal = _colourise(light, (90, 92, 96), (235, 235, 240))
    return np.where(ring[..., None], metal, background), ring, background


def _pill(rng, h, w):
    background = _plain_background(rng, h, w, (60, 90, 130), (110, 150, 190), cell=24)
    cx, cy, _ = _place(rng, h, w)
    body = np.zeros((h, w), np.uint8)
    axes = (int(w * rng.uniform(0.3, 0.36)), int(h * rng.uniform(0.15, 0.19)))
    cv2.ellipse(body, (int(cx), int(cy)), axes, float(rng.uniform(-12, 12)), 0, 360, 1, -1)
    speckles = (rng.random((h, w)) < 0.01) * rng.uniform(-0.25, -0.1)
    value = 0.85 + speckles + _grain(rng, h, w, 0.015)
    value[:, int(cx) - 1 : int(cx) + 1] -= 0.12  # the score line
    pill = _colourise(value, (150, 120, 110), _jitter(rng, (250, 235, 220), 5))
    mask = body.astype(bool)
    return np.where(mask[..., None], pill, background), mask, background


def _bolt(rng, h, w):
    background = _plain_background(rng, h, w, (140, 140, 135), (200, 200, 195))
    cx, cy, short = _place(rng, h, w)
    radius = short * rng.uniform(0.3, 0.36)
    turn = rng.uniform(0, np.pi / 3)
    angles = turn + np.arange(6) * np.pi / 3
    hexagon = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    head = np.zeros((h, w), np.uint8)
    cv2.fillPoly(head, [np.round(hexagon).astype(np.int32)], 1)
    y, x = _grid(h, w)
    inner = np.hypot(x - cx, y - cy) < radius * 0.55
    value = np.where(inner, 0.62, 0.45) + 0.1 * (x - cx) / radius + _grain(rng, h, w, 0.02)
    steel = _colourise(value, (40, 42, 48), (200, 205, 215))
    mask = head.astype(bool)
    return np.where(mask[..., None], steel, background), mask, background


_RENDERERS = {
    "fabric": _fabric,
    "wood": _wood,
    "metal": _metal,
    "tiles": _tiles,
    "washer": _washer,
    "pill": _pill,
    "bolt": _bolt,
}


# ----------------------------------------------------------------------------- defects
# Each returns (mask bool HxW, paint uint8 HxWx3): the defect is `paint` on `mask`, nothing else.


def _point_in(rng: np.random.Generator, region: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(region)
    k = int(rng.integers(ys.size))
    return int(xs[k]), int(ys[k])


def _scratch(rng, image, region, background):
    h, w = region.shape
    x0, y0 = _point_in(rng, region)
    length, angle = rng.uniform(0.2, 0.45) * min(h, w), rng.uniform(0, np.pi)
    bend = rng.uniform(-0.15, 0.15) * length
    t = np.linspace(-0.5, 0.5, 24)
    along, across = t * length, bend * (1 - 4 * t**2)
    points = np.stack(
        [
            x0 + along * np.cos(angle) - across * np.sin(angle),
            y0 + along * np.sin(angle) + across * np.cos(angle),
        ],
        axis=1,
    )
    drawn = np.zeros((h, w), np.uint8)
    cv2.polylines(drawn, [np.round(points).astype(np.int32)], False, 1, int(rng.integers(1, 3)), cv2.LINE_8)
    tone = 245.0 if rng.random() < 0.6 else 15.0
    paint = (0.25 * image + 0.75 * tone).astype(np.uint8)
    return drawn.astype(bool) & region, paint


def _hole(rng, image, region, background):
    h, w = region.shape
    x0, y0 = _point_in(rng, region)
    radius = max(3, int(rng.uniform(0.04, 0.09) * min(h, w)))
    disc = np.zeros((h, w), np.uint8)
    cv2.circle(disc, (x0, y0), radius, 1, -1, cv2.LINE_8)
    y, x = _grid(h, w)
    depth = np.clip(np.hypot(x - x0, y - y0) / radius, 0, 1)  # darker towards the middle
    paint = _colourise(0.04 + 0.12 * depth, (5, 5, 5), (120, 110, 100))
    return disc.astype(bool) & region, paint


def _stain(rng, image, region, background):
    h, w = region.shape
    x0, y0 = _point_in(rng, region)
    blob = np.zeros((h, w), np.float32)
    spread = rng.uniform(0.05, 0.1) * min(h, w)
    for _ in range(int(rng.integers(2, 5))):
        centre = (int(x0 + rng.normal(0, spread / 2)), int(y0 + rng.normal(0, spread / 2)))
        axes = (max(2, int(spread * rng.uniform(0.5, 1))), max(2, int(spread * rng.uniform(0.5, 1))))
        cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(blob, (0, 0), spread / 4) * rng.uniform(0.65, 0.9)  # soft edges
    mask = (alpha >= 0.25) & region  # the faintest rim is dropped, not painted: the mask stays exact
    colour = np.array(
        [(110, 60, 20), (30, 25, 20), (150, 30, 90), (200, 170, 40)][int(rng.integers(4))], np.float32
    )
    paint = image * (1 - alpha[..., None]) + colour * alpha[..., None]
    return mask, np.clip(paint, 0, 255).astype(np.uint8)


def _crack(rng, image, region, background):
    h, w = region.shape
    drawn = np.zeros((h, w), np.uint8)
    x, y = _point_in(rng, region)
    heading = rng.uniform(0, 2 * np.pi)
    points = [(x, y)]
    for _ in range(int(rng.integers(15, 40))):  # a random walk with a slowly turning heading
        heading += rng.normal(0, 0.45)
        step = rng.uniform(2, 5)
        x, y = x + step * np.cos(heading), y + step * np.sin(heading)
        points.append((x, y))
    cv2.polylines(
        drawn, [np.round(np.array(points)).astype(np.int32)], False, 1, int(rng.integers(1, 3)), cv2.LINE_8
    )
    paint = (image * 0.25).astype(np.uint8)
    return drawn.astype(bool) & region, paint


def _missing(rng, image, region, background):
    if background is None:
        raise ValueError("a missing piece needs a background to reveal (objects only)")
    edge = region & ~cv2.erode(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    x0, y0 = _point_in(rng, edge)
    h, w = region.shape
    cut = np.zeros((h, w), np.uint8)
    axes = (int(rng.uniform(0.07, 0.13) * min(h, w)), int(rng.uniform(0.05, 0.1) * min(h, w)))
    cv2.ellipse(cut, (x0, y0), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return cut.astype(bool) & region, background


_DEFECTS = {"scratch": _scratch, "hole": _hole, "stain": _stain, "crack": _crack, "missing": _missing}
