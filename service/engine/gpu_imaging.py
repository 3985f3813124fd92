"""The worker's image work on the model's device: JPEG decode, model inputs, heatmap overlay, JPEG encode.

Why: on a GPU worker the CPU work around the model (PIL decode, bicubic resize to the CLIP frame,
Grounding DINO's processor, the overlay and its JPEG) costs about 31 ms per 1.5 MP JPEG, which caps
each CPU core near 30 images/s however fast the model runs. Here the same steps are torch operations on
the device the model runs on (nvJPEG through `torchvision.io` on CUDA); every function also runs on
CPU tensors, which is how the tests check it against the CPU path.

What stays on the CPU: `decode_images` reads every header with `service.core.imaging.probe_image` first
(non-images, bombs and too-small images get its `ImageDecodeError` in their slot, exactly as the CPU
path refuses them), and hands back `None` - "decode this one with `decode_image`" - for anything
but a plain JPEG: other formats (PNG, WebP, ...), CMYK JPEGs, JPEGs that do not end with the EOI
marker (truncated uploads: the CPU path refuses them with its own error, never a half-grey picture)
and JPEGs the decoder raises on (if the batched call raises, each image is retried alone).

Deviations from the CPU path, measured by tests/test_gpu_imaging.py (which asserts each with a margin)
on CPU tensors here and on CUDA on an H200 (torch 2.11, torchvision 0.26, nvJPEG); equal on both unless
both are given:

* decode: on the CPU libjpeg-turbo, bit-exact with PIL. nvJPEG: 4:4:4 and grey JPEGs exact; 4:2:0 ones
  differ at colour edges, its chroma upsampling not being libjpeg's "fancy" one (max 34 and 9 grey
  levels, mean 0.17 and 0.16 on two photo-like images).
* `clip_input` vs open_clip's PIL preprocess: resizing in two 8-bit passes like PIL leaves one grey
  level (0.0150 normalised) at ~1e-5 of the values downscaling, two levels upscaling 300x400 -> 518;
  mean <= 1.2e-5 (a single float pass would differ by a level at ~15% of them). Through the random
  demo model (1500x1000 JPEG, 518 frame): max |map diff| 9.2e-4, |score diff| <= 6.6e-7; with nvJPEG's
  decode too, 2.1e-2 and 1.1e-5.
* `grounding_input` vs the Hugging Face processor: the same size always (`grounding_size`); max one grey
  level (0.0175 normalised) on the CPU, two on CUDA, mean <= 1.6e-4.
* `overlay` vs `service.core.imaging.fast_overlay`: mean |diff| <= 0.10 grey levels, 99th percentile 1,
  max 3 (OpenCV's fixed-point shrink; JET steps where a map value's truncation flips). The box
  outlines are `cv2.rectangle`'s pixel for pixel.
* `encode_jpeg`: on the CPU byte-identical to `service.core.imaging.encode_jpeg`. nvJPEG encodes 4:4:4
  (torchvision offers no choice): at quality 85, 51 KB instead of 37 KB with a slightly smaller error
  (2.41 grey levels mean against 2.57); its quality 75 gives 31 KB at 2.52.

Cost on the H200 for a batch of 16 1.5 MP JPEGs: 1.3 ms per image for decode, CLIP input, overlay and
its JPEG (1.4 ms with Grounding DINO's input), against 37 ms (49 ms) of the CPU path on one core of
the same machine. torchvision 0.29 deprecates `torchvision.io`'s codecs in favour of TorchCodec; they
still work (with a DeprecationWarning).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.io import encode_jpeg as _tv_encode_jpeg

from models.frame import FrameGeometry, center_crop_offsets, resized_size
from models.grounding.detector import PROCESSOR_LONGEST_EDGE, PROCESSOR_SHORTEST_EDGE
from service.core.imaging import ImageDecodeError, probe_image

Device = str | torch.device
Box = tuple[float, float, float, float]
DecodeResult = torch.Tensor | ImageDecodeError | None

JPEG_EOI = b"\xff\xd9"
GREEN = (0, 255, 0)
# JPEG colour layouts the device decoders turn into RGB as PIL does; CMYK (Adobe's inverted kind
# included) is left to PIL, whose conversion the CPU path defines.
_DEVICE_JPEG_MODES = ("RGB", "L")


# --- decoding ---------------------------------------------------------------------------------------------


def decode_images(datas: Sequence[bytes], device: Device, max_pixels: int) -> list[DecodeResult]:
    """Decode a batch of uploads on `device`: per slot an HxWx3 uint8 RGB tensor, the
    `ImageDecodeError` the header check raised, or None where the CPU path (`decode_image`) must do it.

    All device-decodable JPEGs go to the decoder in one call (nvJPEG's batched decode on CUDA).
    """
    results: list[DecodeResult] = [None] * len(datas)
    jpegs: list[int] = []
    for i, data in enumerate(datas):
        try:
            info = probe_image(data, max_pixels)
        except ImageDecodeError as err:
            results[i] = err
            continue
        if info.format == "JPEG" and _device_decodable(data):
            jpegs.append(i)
    for i, image in zip(jpegs, _decode_jpegs([datas[i] for i in jpegs], device), strict=True):
        results[i] = image
    return results


def _device_decodable(data: bytes) -> bool:
    """A complete JPEG (ends with EOI: a truncated upload does not) in a layout the device decodes like PIL."""
    if not data.endswith(JPEG_EOI):
        return False
    with Image.open(io.BytesIO(data)) as img:  # the header again: microseconds, no pixels
        return img.mode in _DEVICE_JPEG_MODES


def _decode_jpegs(datas: Sequence[bytes], device: Device) -> list[torch.Tensor | None]:
    if not datas:
        return []
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        decoded: list[torch.Tensor | None] = list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except Exception:  # any decoder failure (nvJPEG raises for the whole batch): find the culprits alone
        decoded = [_decode_one(e, device) for e in encoded]
    return [None if d is None else d.permute(1, 2, 0).contiguous() for d in decoded]


def _decode_one(encoded: torch.Tensor, device: Device) -> torch.Tensor | None:
    """One JPEG alone; None if the decoder refuses it (the CPU path then gives the client its error)."""
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except Exception:  # whatever the decoder raises, PIL gets its say
        return None


# --- model inputs -------------------------------------------------------------------------------------------


def clip_input(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, size, size) float32 CLIP input of an HxWx3 uint8 image: open_clip's eval preprocess on the device.

    Shorter side to `size` (bicubic, antialiased: PIL's kernel), rounded to 8 bits as PIL's result
    is, centre crop, /255, OpenAI mean/std: the geometry of `models.frame.FrameGeometry` exactly.
    """
    h, w = image.shape[:2]
    rh, rw = resized_size(h, w, size)
    top, left = center_crop_offsets(rh, rw, size)
    pixels = _resize_to_uint8_values(image, (rh, rw), "bicubic")[0, :, top:top + size, left:left + size]
    mean, std = _stats(tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD), pixels.device)
    return pixels.div(255.0).sub_(mean).div_(std)


def grounding_size(height: int, width: int, shortest_edge: int = PROCESSOR_SHORTEST_EDGE,
                   longest_edge: int = PROCESSOR_LONGEST_EDGE) -> tuple[int, int]:
    """(h, w) Grounding DINO's image processor resizes an image to.

    transformers' `get_size_with_aspect_ratio` step for step (including its truncations, and leaving
    an image alone whose shorter side already has the target length), so the detector sees the same
    grid of patches as from the CPU path.
    """
    size, raw_size = shortest_edge, None
    short, long = float(min(height, width)), float(max(height, width))
    if long / short * size > longest_edge:
        raw_size = longest_edge * short / long
        size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        return (int(raw_size * height / width) if raw_size is not None else int(size * height / width)), size
    return size, (int(raw_size * width / height) if raw_size is not None else int(size * width / height))


def grounding_input(image: torch.Tensor, shortest_edge: int = PROCESSOR_SHORTEST_EDGE,
                    longest_edge: int = PROCESSOR_LONGEST_EDGE) -> torch.Tensor:
    """(1, 3, h, w) float32 Grounding DINO input of an HxWx3 uint8 image, as its image processor makes it:
    bilinear antialiased resize to `grounding_size`, 8-bit rounding, ImageNet mean/std on 0..255."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    hw = grounding_size(image.shape[0], image.shape[1], shortest_edge, longest_edge)
    pixels = _resize_to_uint8_values(image, hw, "bilinear")
    mean, std = _stats(tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD), pixels.device)
    return pixels.sub_(mean * 255.0).div_(std * 255.0)  # the processor's fused rescale + normalise


def _resize_to_uint8_values(image: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    """(1, 3, h, w) float32 holding the integers 0..255 an 8-bit antialiased resize of `image` gives.

    Like PIL (and torchvision's uint8 kernel): the width first, then the height, each pass rounded
    to 8 bits; one float pass instead would differ from them by a grey level at ~15% of pixels.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"images must be HxWx3 uint8 RGB tensors, got {tuple(image.shape)} {image.dtype}")
    pixels = image.permute(2, 0, 1).unsqueeze(0).float()
    for step in ((image.shape[0], hw[1]), tuple(hw)):
        if tuple(pixels.shape[-2:]) != step:
            pixels = F.interpolate(pixels, size=step, mode=mode, antialias=True, align_corners=False)
            pixels = pixels.round_().clamp_(0.0, 255.0)
    return pixels


@lru_cache(maxsize=16)
def _stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation constants as (3, 1, 1) tensors, made once per device."""
    def column(values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).view(3, 1, 1)

    return column(mean), column(std)


# --- heatmap overlay ------------------------------------------------------------------------------------------


def overlay(image: torch.Tensor, anomaly_map: torch.Tensor, out_hw: tuple[int, int],
            boxes: Sequence[Box] | None = None, alpha: float = 0.5) -> torch.Tensor:
    """`service.core.imaging.fast_overlay` on the device: (oh, ow, 3) uint8, the JET-coloured map blended over
    the image (shrunk to `out_hw`) where the model looked, boxes (original pixels) drawn in green."""
    orig_h, orig_w = image.shape[:2]
    out = _shrink(image, out_hw)
    rect = _covered_rect((orig_h, orig_w), anomaly_map.shape[0], out_hw)
    if rect is not None:
        y0, y1, x0, x1 = rect
        values = _map_on_output(anomaly_map.to(image.device, torch.float32), (orig_h, orig_w), out_hw)[y0:y1, x0:x1]
        heat = jet_lut(image.device)[values.mul(255.0).clamp_(0.0, 255.0).to(torch.uint8).long()]
        roi = out[y0:y1, x0:x1]
        roi.copy_((roi.float() * (1 - alpha) + heat.float() * alpha).round_().clamp_(0.0, 255.0).to(torch.uint8))
    ky, kx = out_hw[0] / orig_h, out_hw[1] / orig_w
    _draw_boxes(out, [(bx1 * kx, by1 * ky, bx2 * kx, by2 * ky) for bx1, by1, bx2, by2 in boxes or []])
    return out


def _shrink(image: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """`service.core.imaging.shrink`: an integer-factor area reduction, then bilinear; a new tensor."""
    h, w = image.shape[:2]
    oh, ow = out_hw
    if (oh, ow) == (h, w):
        return image.clone()
    pixels = image.permute(2, 0, 1).unsqueeze(0).float()
    k = min(h // oh, w // ow)
    if k >= 2:
        pixels = F.avg_pool2d(pixels[..., :h - h % k, :w - w % k], k).round_()  # OpenCV's pass ends in 8 bits
    if tuple(pixels.shape[-2:]) != (oh, ow):
        pixels = F.interpolate(pixels, size=(oh, ow), mode="bilinear", align_corners=False)
    return pixels.round_().clamp_(0.0, 255.0).to(torch.uint8)[0].permute(1, 2, 0).contiguous()


def _covered_rect(orig_hw: tuple[int, int], size: int,
                  out_hw: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the output pixels the model frame covers: `fast_overlay`'s arithmetic."""
    geo = FrameGeometry(orig_hw[0], orig_hw[1], size)
    (rh, rw), (top, left) = geo.resized_hw, geo.crop_top_left
    oh, ow = out_hw
    sy, sx = rh / oh, rw / ow
    y0, y1 = min(oh, math.ceil(top / sy)), min(oh, math.ceil((top + size) / sy))
    x0, x1 = min(ow, math.ceil(left / sx)), min(ow, math.ceil((left + size) / sx))
    return (y0, y1, x0, x1) if y1 > y0 and x1 > x0 else None


def _map_on_output(anomaly_map: torch.Tensor, orig_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """`service.core.imaging.map_to_original`'s values: the map on the resized-image canvas (zeros where the
    crop cut), resized bilinearly to `out_hw`. The canvas is frame-sized, small even on a GPU."""
    size = anomaly_map.shape[0]
    geo = FrameGeometry(orig_hw[0], orig_hw[1], size)
    (rh, rw), (top, left) = geo.resized_hw, geo.crop_top_left
    canvas = anomaly_map.new_zeros((1, 1, rh, rw))
    canvas[0, 0, top:top + size, left:left + size] = anomaly_map
    if (rh, rw) != tuple(out_hw):
        canvas = F.interpolate(canvas, size=tuple(out_hw), mode="bilinear", align_corners=False)
    return canvas[0, 0]


@lru_cache(maxsize=8)
def jet_lut(device: torch.device) -> torch.Tensor:
    """(256, 3) uint8 RGB: OpenCV's COLORMAP_JET as a lookup table, built once per device."""
    import cv2
    import numpy as np

    bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(1, 256), cv2.COLORMAP_JET)[0]
    return torch.from_numpy(np.ascontiguousarray(bgr[:, ::-1])).to(device)


def _draw_boxes(rgb: torch.Tensor, boxes: Sequence[Box]) -> None:
    """`service.core.imaging._draw_boxes` in place: OpenCV's 2-px rectangle, which is three pixels wide
    (the corner +-1) with the four outermost corner pixels left out (its round line caps)."""
    green = torch.tensor(GREEN, dtype=torch.uint8, device=rgb.device)
    for x1, y1, x2, y2 in boxes:
        xa, xb = sorted((int(round(x1)), int(round(x2))))
        ya, yb = sorted((int(round(y1)), int(round(y2))))
        _draw_outline(rgb, xa, ya, xb, yb, green)


def _draw_outline(rgb: torch.Tensor, xa: int, ya: int, xb: int, yb: int, green: torch.Tensor) -> None:
    h, w = rgb.shape[:2]
    r0, r1, c0, c1 = max(0, ya - 1), min(h, yb + 2), max(0, xa - 1), min(w, xb + 2)
    if r1 <= r0 or c1 <= c0:
        return
    rows = torch.arange(r0, r1, device=rgb.device)[:, None]
    cols = torch.arange(c0, c1, device=rgb.device)[None, :]
    inner = (rows > ya + 1) & (rows < yb - 1) & (cols > xa + 1) & (cols < xb - 1)
    corner = ((rows == ya - 1) | (rows == yb + 1)) & ((cols == xa - 1) | (cols == xb + 1))
    region = rgb[r0:r1, c0:c1]
    region.copy_(torch.where((~inner & ~corner)[..., None], green, region))


# --- encoding -------------------------------------------------------------------------------------------------


def encode_jpeg(rgb: torch.Tensor, quality: int = 85) -> bytes:
    """JPEG bytes of an HxWx3 uint8 RGB tensor, encoded where it lies (nvJPEG on CUDA)."""
    encoded = _tv_encode_jpeg(rgb.permute(2, 0, 1).contiguous(), quality=quality)
    return encoded.cpu().numpy().tobytes()
