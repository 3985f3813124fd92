"""FrameGeometry against torchvision's own Resize + CenterCrop.

The image used here stores each pixel's own (row, col) as its value, so after torchvision resizes and crops
it, every frame pixel tells where it came from; FrameGeometry must predict exactly that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from models.frame import FrameGeometry, center_crop_offsets, resized_size

SIZE = 518

# (orig_h, orig_w): square up/down/identity, landscape, portrait, odd, and crop excesses of 1, 3 and 5 pixels,
# where torchvision's half-to-even rounding of the offset shows (0.5 -> 0, 1.5 -> 2, 2.5 -> 2).
SHAPES = [
    (518, 518),
    (300, 300),
    (1000, 1000),
    (400, 640),
    (700, 450),
    (333, 517),
    (519, 518),
    (521, 518),
    (518, 523),
    (97, 1001),
]


def coordinate_image(h: int, w: int) -> torch.Tensor:
    """(2, h, w) float image whose channel 0 is the row index and channel 1 the column index."""
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    return torch.stack([rows, cols])


def torchvision_frame(img: torch.Tensor, size: int = SIZE) -> tuple[torch.Tensor, tuple[int, int]]:
    """The frame as torchvision makes it (nearest-exact so values are copied, not mixed), and the resized hw."""
    resized = transforms.Resize(size, interpolation=InterpolationMode.NEAREST_EXACT)(img)
    return transforms.CenterCrop(size)(resized), tuple(resized.shape[-2:])


@pytest.mark.parametrize("orig_h, orig_w", SHAPES)
def test_resized_hw_and_offsets_match_torchvision(orig_h: int, orig_w: int) -> None:
    geom = FrameGeometry(orig_h, orig_w, SIZE)
    frame, resized_hw = torchvision_frame(coordinate_image(orig_h, orig_w))
    assert geom.resized_hw == resized_hw
    top, left = geom.crop_top_left
    # The crop offset is where the frame's first resized pixel sits: check it through the content, too.
    resized = transforms.Resize(SIZE, interpolation=InterpolationMode.NEAREST_EXACT)(
        coordinate_image(orig_h, orig_w)
    )
    assert torch.equal(frame, resized[:, top : top + SIZE, left : left + SIZE])


@pytest.mark.parametrize("orig_h, orig_w", SHAPES)
def test_every_frame_pixel_comes_from_where_to_original_says(orig_h: int, orig_w: int) -> None:
    geom = FrameGeometry(orig_h, orig_w, SIZE)
    frame, _ = torchvision_frame(coordinate_image(orig_h, orig_w))
    jj, ii = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    x, y = geom.to_original(ii + 0.5, jj + 0.5)
    # torchvision computes nearest-exact in float32: skip the few centres within 1e-3 of a pixel border,
    # where float32 and float64 may round to different sides; everything else must agree exactly.
    clear = (np.abs(x - np.round(x)) > 1e-3) & (np.abs(y - np.round(y)) > 1e-3)
    assert clear.mean() > 0.9
    src_rows = frame[0].numpy()
    src_cols = frame[1].numpy()
    assert np.array_equal(np.floor(y)[clear], src_rows[clear])
    assert np.array_equal(np.floor(x)[clear], src_cols[clear])


@pytest.mark.parametrize("orig_h, orig_w", SHAPES)
def test_round_trip(orig_h: int, orig_w: int) -> None:
    geom = FrameGeometry(orig_h, orig_w, SIZE)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, orig_w, 50)
    y = rng.uniform(0, orig_h, 50)
    fx, fy = geom.to_frame(x, y)
    bx, by = geom.to_original(fx, fy)
    np.testing.assert_allclose(bx, x, atol=1e-9)
    np.testing.assert_allclose(by, y, atol=1e-9)


def test_hand_computed_landscape() -> None:
    # 400 x 640: short side 400 -> 518, long int(518 * 640 / 400) = int(828.8) = 828, left = round(155.0).
    geom = FrameGeometry(400, 640)
    assert geom.resized_hw == (518, 828)
    assert geom.crop_top_left == (0, 155)
    fx, fy = geom.to_frame(320.0, 200.0)  # the image centre
    assert fx == pytest.approx(320 * 828 / 640 - 155)
    assert fy == pytest.approx(259.0)


def test_hand_computed_portrait_and_half_to_even() -> None:
    # 523 wide, 518 high: no resize, excess 5 -> left = round(2.5) = 2 (half to even), not 3.
    assert FrameGeometry(518, 523).crop_top_left == (0, 2)
    assert FrameGeometry(521, 518).crop_top_left == (2, 0)  # round(1.5) = 2
    assert FrameGeometry(519, 518).crop_top_left == (0, 0)  # round(0.5) = 0
    assert resized_size(700, 450, 518) == (805, 518)  # int(518 * 700 / 450) = int(805.78)
    assert center_crop_offsets(805, 518, 518) == (144, 0)  # round(143.5) = 144


def test_square_is_pure_scale() -> None:
    geom = FrameGeometry(1000, 1000)
    assert geom.crop_top_left == (0, 0)
    assert geom.to_frame(500.0, 250.0) == pytest.approx((259.0, 129.5))


def test_boxes_numpy_and_torch() -> None:
    geom = FrameGeometry(400, 640)
    boxes = np.array([[0.0, 0.0, 640.0, 400.0], [155 * 640 / 828, 10.0, 320.0, 200.0]])
    framed = geom.boxes_to_frame(boxes)
    assert isinstance(framed, np.ndarray)
    np.testing.assert_allclose(framed[0], [-155.0, 0.0, 828 - 155.0, 518.0])
    np.testing.assert_allclose(framed[1, 0], 0.0, atol=1e-9)
    np.testing.assert_allclose(geom.boxes_to_original(framed), boxes, atol=1e-9)

    t = torch.tensor(boxes, dtype=torch.float32)
    framed_t = geom.boxes_to_frame(t)
    assert isinstance(framed_t, torch.Tensor) and framed_t.dtype == torch.float32
    np.testing.assert_allclose(framed_t.numpy(), framed, rtol=1e-6, atol=1e-4)


def test_bad_shapes_rejected() -> None:
    with pytest.raises(ValueError):
        FrameGeometry(0, 10)
    with pytest.raises(ValueError):
        FrameGeometry(10, 10).boxes_to_frame(np.zeros((3,)))
