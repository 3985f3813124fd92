"""Bytes to pixels and pixels to pictures: decoding untrusted images, heatmaps, PNG/JPEG encoding.

Decoding is where hostile input arrives (truncated files, decompression bombs, things that are not
images), so every failure becomes an `ImageDecodeError` with a stable code the API maps to a 4xx.
`probe_image` reads the header only (format, size, the pixel limit): the queue-mode API uses it so
that the image is decoded once, by the worker, which refuses truncated files before they join a
batch. EXIF orientation is deliberately not applied: the released FiLo code did not, and a map must
line up with the pixels as stored.

Heatmaps are rendered at the size the client asked for (`heatmap_size`), not at the original size:
a dashboard shows a few hundred pixels, and PNG-encoding a camera-sized overlay costs more CPU than
decoding the image did. The raw-map kind is the map quantized to 8 bits, `v = round(255 * clip(m, 0,
1))`, so `|v / 255 - m| <= 1/510` wherever the map is in [0, 1] (FiLo's maps are).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from models.frame import FrameGeometry

ImageFile.LOAD_TRUNCATED_IMAGES = False
# The pixel limit is the configured `max_image_pixels`, checked from the header (`probe_image`) before
# any pixel is decoded, by every decode here. Pillow's own process-wide limit (a warning past 89 MP, an
# error past twice that) would otherwise refuse first, with its own message instead of the configured
# limit, and cap what can be configured.
Image.MAX_IMAGE_PIXELS = None
# Images are processed in parallel by request (API) or entry (worker) threads already; OpenCV's own
# pool on top would oversubscribe the cores and hide its CPU from per-thread accounting (the bench).
cv2.setNumThreads(1)


class ImageDecodeError(ValueError):
    """code: not_an_image | truncated_image | decompression_bomb | unsupported_image."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says, read without decoding its pixels."""

    width: int
    height: int
    format: str


def probe_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Header only: refuse what is not an image, too small, or over `max_pixels` (a bomb) - cheaply.

    Costs microseconds instead of a decode. The pixels themselves are checked by `decode_image`
    where they are needed (the worker, before the batch), which is where truncation shows.
    """
    if not data:
        raise ImageDecodeError("not_an_image", "the image is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            (w, h), fmt = img.size, img.format or "unknown"
    except UnidentifiedImageError:
        raise ImageDecodeError("not_an_image", "the data is not an image in a supported format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # only if someone restored Pillow's limit
        raise _pillow_refused(max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError("truncated_image", f"the image header could not be read ({exc})") from None
    if w * h > max_pixels:
        raise ImageDecodeError("decompression_bomb", f"image of {w}x{h} = {w * h} pixels exceeds the limit of "
                               f"{max_pixels} pixels (max_image_pixels)")
    if w < 2 or h < 2:
        raise ImageDecodeError("unsupported_image", f"image of {w}x{h} is too small to inspect")
    return ImageInfo(w, h, fmt)


def _pillow_refused(max_pixels: int) -> ImageDecodeError:
    return ImageDecodeError("decompression_bomb", f"the image exceeds Pillow's pixel limit ({Image.MAX_IMAGE_PIXELS}); "
                            f"the configured limit is {max_pixels} pixels (max_image_pixels)")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode to HxWx3 uint8 RGB; the header checks of `probe_image` come first, before any pixel."""
    probe_image(data, max_pixels)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _pillow_refused(max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError("truncated_image", f"the image could not be decoded completely ({exc})") from None
    try:
        rgb = img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ImageDecodeError("unsupported_image", f"image mode {img.mode!r} cannot be converted ({exc})") from None
    return np.array(rgb, dtype=np.uint8)  # one copy, writable


IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


def list_images(folder: Path) -> list[Path]:
    """The image files of a folder, in name order (hidden files skipped): reference folders and datasets."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def read_image_file(path: str, max_pixels: int = 200_000_000) -> np.ndarray:
    with open(path, "rb") as f:
        return decode_image(f.read(), max_pixels)


def map_to_original(anomaly_map: np.ndarray, orig_hw: tuple[int, int],
                    out_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Place a model-frame map back onto the original image (scaled to `out_hw`, default its own size).

    Returns (map, coverage mask): pixels cropped away by the preprocessing were never inspected;
    their map value is 0 and coverage False.
    """
    size = anomaly_map.shape[0]
    geo = FrameGeometry(orig_hw[0], orig_hw[1], size)
    rh, rw = geo.resized_hw
    top, left = geo.crop_top_left
    canvas = np.zeros((rh, rw), np.float32)
    cover = np.zeros((rh, rw), np.float32)
    canvas[top:top + size, left:left + size] = anomaly_map
    cover[top:top + size, left:left + size] = 1.0
    h, w = out_hw or orig_hw
    if (rh, rw) != (h, w):
        canvas = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_LINEAR)
        cover = cv2.resize(cover, (w, h), interpolation=cv2.INTER_NEAREST)
    return canvas.astype(np.float32), cover > 0.5


def heatmap_overlay(image: np.ndarray, anomaly_map: np.ndarray, alpha: float = 0.5,
                    boxes: list[tuple[float, float, float, float]] | None = None,
                    out_hw: tuple[int, int] | None = None) -> np.ndarray:
    """JET heatmap of a [0, 1] map blended over the original image (RGB uint8), at `out_hw`
    (default: the original size; boxes are given in original pixels and scaled with it)."""
    orig_hw = image.shape[:2]
    out_hw = out_hw or orig_hw
    if out_hw != orig_hw:
        image = cv2.resize(image, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_AREA)
    values, cover = map_to_original(anomaly_map, orig_hw, out_hw)
    heat = cv2.applyColorMap(np.clip(values * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32)
    out = image.astype(np.float32)
    blend = (1 - alpha) * out + alpha * heat
    out = np.where(cover[..., None], blend, out)
    out = np.clip(out, 0, 255).astype(np.uint8)
    sy, sx = out_hw[0] / orig_hw[0], out_hw[1] / orig_hw[1]
    _draw_boxes(out, [(x1 * sx, y1 * sy, x2 * sx, y2 * sy) for x1, y1, x2, y2 in boxes or []])
    return out


def shrink(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Resize for display, cheaply: an integer-factor area reduction (OpenCV's fast path), then bilinear.

    Plain INTER_AREA at a fractional factor costs ~4x more; bilinear alone aliases past a factor of 2.
    """
    h, w = image.shape[:2]
    oh, ow = out_hw
    if (oh, ow) == (h, w):
        return image
    k = min(h // oh, w // ow)
    if k >= 2:
        hh, ww = h - h % k, w - w % k  # exact multiples keep OpenCV on its integer path
        image = cv2.resize(image[:hh, :ww], (ww // k, hh // k), interpolation=cv2.INTER_AREA)
    if image.shape[:2] == (oh, ow):
        return image
    return cv2.resize(image, (ow, oh), interpolation=cv2.INTER_LINEAR)


def fast_overlay(image: np.ndarray, anomaly_map: np.ndarray, out_hw: tuple[int, int],
                 boxes: list[tuple[float, float, float, float]] | None = None, alpha: float = 0.5) -> np.ndarray:
    """`heatmap_overlay` for the service, several times cheaper: uint8 arithmetic on the covered
    rectangle only. The map is sampled exactly where `map_to_original` samples it (bilinear, zero
    outside the crop) and the covered rectangle is the one its nearest-neighbour mask gives, so the
    picture differs from the plain path by the blend's rounding (one grey level) alone."""
    orig_hw = image.shape[:2]
    out = np.array(shrink(image, out_hw), copy=True)
    oh, ow = out_hw
    size = anomaly_map.shape[0]
    geo = FrameGeometry(orig_hw[0], orig_hw[1], size)
    rh, rw = geo.resized_hw
    top, left = geo.crop_top_left
    sy, sx = rh / oh, rw / ow  # output pixel -> resized-canvas pixel (what cv2.resize does)
    y0, y1 = min(oh, math.ceil(top / sy)), min(oh, math.ceil((top + size) / sy))
    x0, x1 = min(ow, math.ceil(left / sx)), min(ow, math.ceil((left + size) / sx))
    if y1 > y0 and x1 > x0:
        # canvas coordinate of output pixel X (pixel centres aligned): (X + 0.5) * sx - 0.5, less the crop.
        # Inside the canvas the crop's surroundings are zeros; past the canvas edge resize replicates.
        pt, pl = int(top > 0), int(left > 0)
        padded = cv2.copyMakeBorder(anomaly_map.astype(np.float32, copy=False), pt, int(top + size < rh), pl,
                                    int(left + size < rw), cv2.BORDER_CONSTANT, value=0.0)
        warp = np.array([[sx, 0.0, (x0 + 0.5) * sx - 0.5 - left + pl], [0.0, sy, (y0 + 0.5) * sy - 0.5 - top + pt]])
        values = cv2.warpAffine(padded, warp, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_REPLICATE)
        heat = cv2.applyColorMap(np.clip(values * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
        roi = out[y0:y1, x0:x1]
        cv2.addWeighted(roi, 1 - alpha, cv2.cvtColor(heat, cv2.COLOR_BGR2RGB), alpha, 0.0, dst=roi)
    ky, kx = oh / orig_hw[0], ow / orig_hw[1]
    _draw_boxes(out, [(bx1 * kx, by1 * ky, bx2 * kx, by2 * ky) for bx1, by1, bx2, by2 in boxes or []])
    return out


def _draw_boxes(rgb: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> None:
    for x1, y1, x2, y2 in boxes:
        cv2.rectangle(rgb, (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2))), (0, 255, 0), 2)


def frame_image(image: np.ndarray, size: int) -> np.ndarray:
    """The image as the model saw it: shorter side resized to `size`, centre square cut out (for display)."""
    geo = FrameGeometry(image.shape[0], image.shape[1], size)
    rh, rw = geo.resized_hw
    top, left = geo.crop_top_left
    resized = shrink(image, (rh, rw)) if rh <= image.shape[0] else cv2.resize(image, (rw, rh))
    return np.ascontiguousarray(resized[top:top + size, left:left + size])


def encode_png(rgb: np.ndarray, level: int | None = None) -> bytes:
    """PNG bytes of RGB or grayscale pixels; `level` is zlib's (None: OpenCV's fast default)."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    ok, buf = cv2.imencode(".png", bgr, [] if level is None else [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def heatmap_png(image: np.ndarray, anomaly_map: np.ndarray, image_size: int | None = None,
                boxes: list[tuple[float, float, float, float]] | None = None) -> bytes:
    """The heatmap overlaid on the original image, at its original size, as PNG bytes."""
    if image_size is not None and anomaly_map.shape != (image_size, image_size):
        raise ValueError(f"map of shape {anomaly_map.shape} is not in the {image_size}px model frame")
    return encode_png(heatmap_overlay(image, anomaly_map, boxes=boxes))


# --- heatmaps as a client asks for them -------------------------------------------------------------------

HeatmapFormat = Literal["jpeg", "png", "map", "none"]
HeatmapSize = Literal["original", "frame"] | int
MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "map": "image/png"}
# Chosen by measurement (docs/benchmarks.md, "Service path costs"): a 1.5 MP photo's JPEG overlay at a long side of
# 768 px was 42 KB and 3.8 ms of worker CPU, against 131 KB at the original size (2.1 MB as PNG).
DEFAULT_HEATMAP_FORMAT: HeatmapFormat = "jpeg"
DEFAULT_HEATMAP_SIZE: HeatmapSize = 768
JPEG_QUALITY = 85
MAP_QUANT_BOUND = 1.0 / 510.0  # |v/255 - m| for the 8-bit map kind (and the uint8 map transport)


@dataclass(frozen=True)
class HeatmapSpec:
    """What picture of the map a client wants: the format (`map` = the raw 8-bit map) and its size."""

    format: HeatmapFormat = DEFAULT_HEATMAP_FORMAT
    size: HeatmapSize = DEFAULT_HEATMAP_SIZE

    @property
    def wanted(self) -> bool:
        return self.format != "none"

    def as_dict(self) -> dict[str, str | int]:
        return {"format": self.format, "size": self.size}

    @classmethod
    def from_dict(cls, data: dict | None) -> HeatmapSpec:
        if not data:
            return cls("none")
        size = data.get("size", DEFAULT_HEATMAP_SIZE)
        return cls(data.get("format", DEFAULT_HEATMAP_FORMAT), int(size) if str(size).isdigit() else size)


@dataclass(frozen=True)
class Heatmap:
    """A rendered heatmap: encoded bytes and what they are."""

    media_type: str
    width: int
    height: int
    kind: Literal["overlay", "map"]
    data: bytes

    def meta(self) -> dict[str, str | int]:
        return {"media_type": self.media_type, "width": self.width, "height": self.height, "kind": self.kind}


def output_hw(orig_hw: tuple[int, int], size: HeatmapSize, frame: int) -> tuple[int, int]:
    """(h, w) of a heatmap: the original size, the model frame, or the original scaled down (never up)
    so that its longer side is at most `size`."""
    if size == "original":
        return orig_hw
    if size == "frame":
        return frame, frame
    h, w = orig_hw
    scale = min(1.0, int(size) / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def quantize_map(anomaly_map: np.ndarray) -> np.ndarray:
    """uint8 map, `round(255 * clip(m, 0, 1))`: within MAP_QUANT_BOUND of every map value in [0, 1]."""
    return np.rint(np.clip(anomaly_map, 0.0, 1.0) * 255.0).astype(np.uint8)


def dequantize_map(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) / np.float32(255.0)


def render_heatmap(image: np.ndarray, anomaly_map: np.ndarray, spec: HeatmapSpec,
                   boxes: list[tuple[float, float, float, float]] | None = None,
                   boxes_frame: list[tuple[float, float, float, float]] | None = None) -> Heatmap:
    """The heatmap `spec` asks for, from the decoded image and the model-frame map.

    `overlay` kinds (jpeg, png) blend the JET-coloured map over the image and draw the valid boxes;
    `map` is the 8-bit map itself, in the model frame or placed on the image's geometry (pixels the
    model never saw are 0).
    """
    if not spec.wanted:
        raise ValueError("render_heatmap called with format 'none'")
    frame = anomaly_map.shape[0]
    h, w = output_hw(image.shape[:2], spec.size, frame)
    if spec.format == "map":
        values = anomaly_map if spec.size == "frame" else map_to_original(anomaly_map, image.shape[:2], (h, w))[0]
        return Heatmap("image/png", w, h, "map", encode_png(quantize_map(values)))
    if spec.size == "frame":
        rgb = fast_overlay(frame_image(image, frame), anomaly_map, (h, w))  # frame -> frame: the map covers all
        _draw_boxes(rgb, list(boxes_frame or []))
    else:
        rgb = fast_overlay(image, anomaly_map, (h, w), boxes)
    data = encode_jpeg(rgb, JPEG_QUALITY) if spec.format == "jpeg" else encode_png(rgb)
    return Heatmap(MEDIA_TYPES[spec.format], w, h, "overlay", data)
