"""Bytes to pixels and pixels to pictures: decoding untrusted images, heatmaps, PNG encoding.

Decoding is where hostile input arrives (truncated files, decompression bombs, things that are not
images), so every failure becomes an `ImageDecodeError` with a stable code the API maps to a 4xx.
EXIF orientation is deliberately not applied: the released FiLo code did not, and a map must line
up with the pixels as stored.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from models.frame import FrameGeometry

ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """code: not_an_image | truncated_image | decompression_bomb | unsupported_image."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode to HxWx3 uint8 RGB, checking the pixel count from the header before decoding."""
    if not data:
        raise ImageDecodeError("not_an_image", "the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(
                    "decompression_bomb", f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
                )
            img.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not_an_image", "the data is not an image in a supported format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("decompression_bomb", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError("truncated_image", f"the image could not be decoded completely ({exc})") from None
    if w < 2 or h < 2:
        raise ImageDecodeError("unsupported_image", f"image of {w}x{h} is too small to inspect")
    try:
        rgb = img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ImageDecodeError("unsupported_image", f"image mode {img.mode!r} cannot be converted ({exc})") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def read_image_file(path: str, max_pixels: int = 200_000_000) -> np.ndarray:
    with open(path, "rb") as f:
        return decode_image(f.read(), max_pixels)


def map_to_original(anomaly_map: np.ndarray, orig_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Place a model-frame map back onto the original image.

    Returns (map at original size, coverage mask): pixels cropped away by the preprocessing were
    never inspected; their map value is 0 and coverage False.
    """
    size = anomaly_map.shape[0]
    geo = FrameGeometry(orig_hw[0], orig_hw[1], size)
    rh, rw = geo.resized_hw
    top, left = geo.crop_top_left
    canvas = np.zeros((rh, rw), np.float32)
    cover = np.zeros((rh, rw), np.float32)
    canvas[top:top + size, left:left + size] = anomaly_map
    cover[top:top + size, left:left + size] = 1.0
    h, w = orig_hw
    if (rh, rw) != (h, w):
        canvas = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_LINEAR)
        cover = cv2.resize(cover, (w, h), interpolation=cv2.INTER_NEAREST)
    return canvas.astype(np.float32), cover > 0.5


def heatmap_overlay(image: np.ndarray, anomaly_map: np.ndarray, alpha: float = 0.5,
                    boxes: list[tuple[float, float, float, float]] | None = None) -> np.ndarray:
    """JET heatmap of a [0, 1] map blended over the original image (RGB uint8, original size)."""
    values, cover = map_to_original(anomaly_map, image.shape[:2])
    heat = cv2.applyColorMap(np.clip(values * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32)
    out = image.astype(np.float32)
    blend = (1 - alpha) * out + alpha * heat
    out = np.where(cover[..., None], blend, out)
    out = np.clip(out, 0, 255).astype(np.uint8)
    for x1, y1, x2, y2 in boxes or []:
        cv2.rectangle(out, (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2))), (0, 255, 0), 2)
    return out


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def heatmap_png(image: np.ndarray, anomaly_map: np.ndarray, image_size: int | None = None,
                boxes: list[tuple[float, float, float, float]] | None = None) -> bytes:
    """The heatmap overlaid on the original image, at its original size, as PNG bytes."""
    if image_size is not None and anomaly_map.shape != (image_size, image_size):
        raise ValueError(f"map of shape {anomaly_map.shape} is not in the {image_size}px model frame")
    return encode_png(heatmap_overlay(image, anomaly_map, boxes=boxes))
