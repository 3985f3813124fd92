"""Geometry of the model's square input frame (open_clip's eval preprocess at a given size).

Every map FiLo produces lives in this frame: the image's shorter side is resized to ``size`` and the
centre ``size`` x ``size`` square is cut out. Boxes found on the original image (Grounding DINO) and
boxes given by users must be carried into the same frame before they can suppress or select anything,
and results must be carried back to show them on the original image. This module is that mapping and
nothing else, so it can be checked against torchvision itself.

Coordinates are continuous pixel coordinates: pixel ``i`` covers ``[i, i + 1)``, so its centre is
``i + 0.5`` and the image spans ``[0, W] x [0, H]``. Under that convention a resize is a pure scale
(``x' = x * new_w / w``) and a crop a pure shift, which is what torchvision's ``NEAREST_EXACT`` and
(antialias-free) bilinear/bicubic resizes assume with ``align_corners=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:  # torch stays unimported here: the API process decodes images without it
    import torch

ArrayLike = Union[np.ndarray, "torch.Tensor", float]


def resized_size(orig_h: int, orig_w: int, size: int) -> tuple[int, int]:
    """Output (h, w) of ``torchvision.transforms.Resize(size)`` for an (orig_h, orig_w) image.

    Same arithmetic as torchvision's ``_compute_resized_output_size`` with one int size and no
    max_size: the shorter side becomes ``size``, the longer ``int(size * long / short)`` (truncated).
    """
    short, long = (orig_w, orig_h) if orig_w <= orig_h else (orig_h, orig_w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if orig_w <= orig_h else (new_long, new_short)
    return new_h, new_w


def center_crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """(top, left) of ``torchvision.transforms.CenterCrop(size)`` on an (h, w) image.

    torchvision uses Python's ``round`` (half to even), so a 5-pixel excess gives an offset of 2, not 3.
    """
    return round((h - size) / 2.0), round((w - size) / 2.0)


@dataclass(frozen=True)
class FrameGeometry:
    """Where an ``orig_h`` x ``orig_w`` image lands in the ``size`` x ``size`` model frame.

    The mapping is ``x_frame = x * sx - left`` and ``y_frame = y * sy - top`` with ``sx = resized_w /
    orig_w``, ``sy = resized_h / orig_h`` (the two differ slightly because the long side is truncated
    to an integer). Frame coordinates outside ``[0, size]`` are parts of the image cut off by the crop.
    """

    orig_h: int
    orig_w: int
    size: int = 518

    def __post_init__(self) -> None:
        if self.orig_h <= 0 or self.orig_w <= 0 or self.size <= 0:
            raise ValueError(f"sizes must be positive, got {self.orig_h}x{self.orig_w} -> {self.size}")

    @property
    def resized_hw(self) -> tuple[int, int]:
        """(h, w) after the shorter-side resize, before the crop."""
        return resized_size(self.orig_h, self.orig_w, self.size)

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) offset of the centre crop inside the resized image."""
        h, w = self.resized_hw
        return center_crop_offsets(h, w, self.size)

    @property
    def scale_xy(self) -> tuple[float, float]:
        """(sx, sy): resized pixels per original pixel along x and y."""
        h, w = self.resized_hw
        return w / self.orig_w, h / self.orig_h

    def to_frame(self, x: ArrayLike, y: ArrayLike) -> tuple[ArrayLike, ArrayLike]:
        """Original-image coordinates -> frame coordinates (elementwise, numpy/torch/float)."""
        sx, sy = self.scale_xy
        top, left = self.crop_top_left
        return x * sx - left, y * sy - top

    def to_original(self, x: ArrayLike, y: ArrayLike) -> tuple[ArrayLike, ArrayLike]:
        """Frame coordinates -> original-image coordinates (the exact inverse of ``to_frame``)."""
        sx, sy = self.scale_xy
        top, left = self.crop_top_left
        return (x + left) / sx, (y + top) / sy

    def boxes_to_frame(self, xyxy: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """(n, 4) x1, y1, x2, y2 boxes in original pixels -> the same boxes in frame pixels (unclipped)."""
        return self._map_boxes(xyxy, self.to_frame)

    def boxes_to_original(self, xyxy: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """(n, 4) x1, y1, x2, y2 boxes in frame pixels -> the same boxes in original pixels."""
        return self._map_boxes(xyxy, self.to_original)

    @staticmethod
    def _map_boxes(xyxy, fn):
        is_torch = type(xyxy).__module__.startswith("torch")
        if is_torch:
            import torch
        boxes = xyxy.to(torch.float64) if is_torch else np.asarray(xyxy, dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must have shape (n, 4), got {tuple(boxes.shape)}")
        x1, y1 = fn(boxes[:, 0], boxes[:, 1])
        x2, y2 = fn(boxes[:, 2], boxes[:, 3])
        if is_torch:
            out_dtype = xyxy.dtype if xyxy.is_floating_point() else torch.float64
            return torch.stack([x1, y1, x2, y2], dim=1).to(out_dtype)
        return np.stack([x1, y1, x2, y2], axis=1)
