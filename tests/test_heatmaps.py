"""Cheap heatmaps and compact results, each checked against the plain path it replaces.

* `fast_overlay` (the service's overlay, uint8 on the covered rectangle) against `heatmap_overlay`
  (the float path `filo inspect --out` keeps);
* the 8-bit map kind and the uint8/float16 map transport against the float32 map, within the stated bounds;
* the header-only probe the queue-mode API runs against the full decode the worker runs.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from filo_lab.bench.stack import encode_image, photo_like
from service.core.imaging import (
    MAP_QUANT_BOUND,
    HeatmapSpec,
    ImageDecodeError,
    decode_image,
    dequantize_map,
    fast_overlay,
    frame_image,
    heatmap_overlay,
    map_to_original,
    output_hw,
    probe_image,
    quantize_map,
    render_heatmap,
)
from service.core.types import AnomalyType, Box, InspectResult
from service.queue.protocol import MAP_ERROR_BOUND, Reply, result_from_dict, result_to_dict


def smooth_map(size: int = 518, seed: int = 0) -> np.ndarray:
    """A map shaped like FiLo's: smooth blobs in [0, 1] (what the blur of the released code leaves)."""
    rng = np.random.default_rng(seed)
    m = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 6)
    return ((m - m.min()) / (m.max() - m.min())).astype(np.float32)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return photo_like(600, 900, seed=3)


def _png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_quantized_map_is_within_its_bound() -> None:
    m = np.random.default_rng(1).random((518, 518)).astype(np.float32)
    m[0, :4] = [0.0, 1.0, 0.5 / 255, 254.5 / 255]  # the edges and rounding midpoints
    back = dequantize_map(quantize_map(m))
    err = np.abs(back - m).max()
    assert err <= MAP_QUANT_BOUND + 1e-7 and err > MAP_QUANT_BOUND * 0.9  # the bound is tight, not loose
    assert quantize_map(np.array([-0.2, 1.7], np.float32)).tolist() == [0, 255]  # outside [0, 1]: clipped


@pytest.mark.parametrize("encoding", ["uint8", "float16", "float32"])
def test_compact_map_transport_keeps_numbers_and_stays_within_bound(encoding: str) -> None:
    amap = smooth_map(seed=2)
    res = InspectResult(0.731, 0.61, float(amap.max()), amap, "top left",
                        [Box(1.5, 2, 30, 40, "scratch", 0.9, True, (0.1, 0.2, 0.3, 0.4))],
                        [AnomalyType("scratch", 0.3)], {"model": 1.0})
    wire = Reply("r1", result=result_to_dict(res), anomaly_map=amap, map_encoding=encoding).encode()
    back = Reply.decode(wire)
    got = result_from_dict(back.result, back.anomaly_map)
    # every reported number is computed by the worker from the float32 map and travels exactly
    assert (got.score, got.text_score, got.map_max, got.position) == (res.score, res.text_score, res.map_max,
                                                                       "top left")
    assert got.boxes == res.boxes and got.top_types == res.top_types
    assert got.anomaly_map.dtype == np.float32 and got.anomaly_map.shape == amap.shape
    assert np.abs(got.anomaly_map - amap).max() <= MAP_ERROR_BOUND[encoding] + 1e-7
    itemsize = {"uint8": 1, "float16": 2, "float32": 4}[encoding]
    assert len(wire) < amap.size * itemsize + 2048  # 268 KB for uint8 instead of 1.07 MB


def test_overlay_from_the_compact_map_matches_the_float_map(photo: np.ndarray) -> None:
    amap = smooth_map(seed=4)
    plain = heatmap_overlay(photo, amap).astype(int)
    for encoding in ("uint8", "float16"):
        back = Reply.decode(Reply("r", result={}, anomaly_map=amap, map_encoding=encoding).encode()).anomaly_map
        diff = np.abs(heatmap_overlay(photo, back).astype(int) - plain)
        # one colour-map step at most (the index moves by <= 1), halved by the 50 % blend
        assert diff.max() <= 4 and diff.mean() < 0.5, (encoding, diff.max(), diff.mean())


def test_fast_overlay_matches_the_plain_overlay(photo: np.ndarray) -> None:
    amap = smooth_map(seed=5)
    boxes = [(100.0, 80.0, 300.0, 260.0)]
    plain = heatmap_overlay(photo, amap, boxes=boxes).astype(int)
    fast = fast_overlay(photo, amap, photo.shape[:2], boxes).astype(int)
    diff = np.abs(fast - plain)
    # the blend's rounding, and a colour-map step where interpolation lands on a boundary
    assert diff.max() <= 4 and diff.mean() < 0.3, (diff.max(), diff.mean())
    # scaled down, it is the plain overlay scaled down (up to the resampling of the two paths)
    small = fast_overlay(photo, amap, (200, 300), boxes).astype(int)
    ref = cv2.resize(plain.astype(np.uint8), (300, 200), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(small - ref).mean() < 4
    # pixels the model never saw (cropped away: the crop starts at x = 151 here) are the image itself
    assert np.array_equal(fast[:, :95], photo[:, :95].astype(int))  # left of the box
    assert not np.array_equal(fast[:, 160:200], photo[:, 160:200].astype(int))


def test_output_sizes() -> None:
    assert output_hw((1000, 1500), "original", 518) == (1000, 1500)
    assert output_hw((1000, 1500), "frame", 518) == (518, 518)
    assert output_hw((1000, 1500), 768, 518) == (512, 768)
    assert output_hw((1500, 1000), 768, 518) == (768, 512)
    assert output_hw((60, 80), 768, 518) == (60, 80)  # never enlarged


def test_map_kind_is_the_quantized_map(photo: np.ndarray) -> None:
    amap = smooth_map(seed=6)
    frame = render_heatmap(photo, amap, HeatmapSpec("map", "frame"))
    assert (frame.kind, frame.media_type, frame.width, frame.height) == ("map", "image/png", 518, 518)
    pixels = _png_pixels(frame.data)
    assert pixels.dtype == np.uint8 and pixels.ndim == 2
    assert np.abs(pixels / 255.0 - amap).max() <= MAP_QUANT_BOUND + 1e-7  # v/255 ~ map value
    original = render_heatmap(photo, amap, HeatmapSpec("map", "original"))
    assert np.array_equal(_png_pixels(original.data), quantize_map(map_to_original(amap, photo.shape[:2])[0]))
    small = render_heatmap(photo, amap, HeatmapSpec("map", 300))
    assert _png_pixels(small.data).shape == (200, 300)


def test_overlay_kinds_and_frame(photo: np.ndarray) -> None:
    amap = smooth_map(seed=7)
    jpeg = render_heatmap(photo, amap, HeatmapSpec("jpeg", 450))
    assert (jpeg.media_type, jpeg.kind, jpeg.width, jpeg.height) == ("image/jpeg", "overlay", 450, 300)
    assert Image.open(io.BytesIO(jpeg.data)).format == "JPEG"
    png = render_heatmap(photo, amap, HeatmapSpec("png", "original"))
    assert np.array_equal(_png_pixels(png.data), fast_overlay(photo, amap, photo.shape[:2]))  # PNG is lossless
    framed = render_heatmap(photo, amap, HeatmapSpec("png", "frame"), boxes_frame=[(10, 10, 100, 100)])
    expected = fast_overlay(frame_image(photo, 518), amap, (518, 518))
    got = _png_pixels(framed.data)
    assert got.shape == (518, 518, 3) and np.array_equal(got[200:, 200:], expected[200:, 200:])
    assert tuple(got[10, 50]) == (0, 255, 0)  # the box, drawn in frame pixels
    with pytest.raises(ValueError):
        render_heatmap(photo, amap, HeatmapSpec("none"))


def test_default_heatmap_of_a_15_mp_photo_is_small() -> None:
    """The issue's size target: the default response for a 1.5 MP photo stays far under 400 KB."""
    image = photo_like(1000, 1500, seed=1)
    heat = render_heatmap(image, smooth_map(seed=8), HeatmapSpec())
    assert (heat.media_type, heat.width, heat.height) == ("image/jpeg", 768, 512)
    assert len(heat.data) * 4 / 3 < 150_000  # base64 in the JSON answer


def test_probe_reads_the_header_and_decode_refuses_what_the_header_hides() -> None:
    data = encode_image(photo_like(120, 160), "PNG")
    info = probe_image(data, 1_000_000)
    assert (info.width, info.height, info.format) == (160, 120, "PNG")
    buf = io.BytesIO()
    Image.new("L", (1500, 1000)).save(buf, format="PNG")  # 1.5 MP in a few kB
    for probe in (probe_image, decode_image):
        with pytest.raises(ImageDecodeError) as bomb:
            probe(buf.getvalue(), 1_000_000)
        assert bomb.value.code == "decompression_bomb"
        with pytest.raises(ImageDecodeError) as junk:
            probe(b"not an image at all", 1_000_000)
        assert junk.value.code == "not_an_image"
        with pytest.raises(ImageDecodeError) as tiny:
            probe(encode_image(np.zeros((1, 5, 3), np.uint8), "PNG"), 1_000_000)
        assert tiny.value.code == "unsupported_image"
    truncated = data[: len(data) // 2]
    assert probe_image(truncated, 1_000_000).width == 160  # the header is intact ...
    with pytest.raises(ImageDecodeError) as cut:  # ... the worker's decode, before any batch, refuses it
        decode_image(truncated, 1_000_000)
    assert cut.value.code == "truncated_image"
