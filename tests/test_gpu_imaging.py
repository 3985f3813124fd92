"""The device image path (service/engine/gpu_imaging.py) against the CPU path it replaces, deviations bounded.

Every test runs on CPU tensors; where CUDA is present each runs on it too (nvJPEG, CUDA kernels).
The bounds are measured figures with a margin; the measurements are in the module's docstring and
next to each bound here (CPU: the 2-core development machine; CUDA: an H200, torch 2.11, torchvision 0.26).
`pytest -rP` prints each test's measurement.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from filo_lab.bench.stack import encode_image, photo_like
from service.core.imaging import ImageDecodeError, decode_image, encode_jpeg, fast_overlay, output_hw, probe_image
from service.core.imaging import _draw_boxes as draw_boxes
from service.engine import gpu_imaging as gi
from tests.conftest import synthetic_image

DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])
MAX_PIXELS = 50_000_000

# |decoded - PIL| in grey levels. CPU: libjpeg-turbo both sides, measured 0. CUDA (nvJPEG, H200): 4:4:4 and
# grey JPEGs exact, 4:2:0 ones differ at colour edges (its chroma upsampling is not libjpeg's "fancy"
# one): measured max 34 and 9, mean 0.169 and 0.161.
DECODE_MAX = {"cpu": 0, "cuda": 48}
DECODE_MEAN = {"cpu": 0.0, "cuda": 0.35}
# |clip_input - PIL preprocess| in normalised units: one grey level is 1 / 255 / 0.2613 = 0.0150. Measured,
# CPU and CUDA alike: max 0.0150 (one level) downscaling, 0.0300 (two) upscaling 300x400; mean <= 1.2e-5
# (the levels differ at ~1e-5 of the values).
CLIP_MAX = {"cpu": 0.0301, "cuda": 0.0301}
CLIP_MEAN = {"cpu": 3e-5, "cuda": 3e-5}
# The tiny demo model's answer from device inputs (1500x1000 JPEG, 518 frame), keyed (device, what ran
# there). Measured: resize alone max |map diff| 9.2e-4, |score diff| 6.6e-7 (CPU) / 3.3e-7 (CUDA); CUDA
# decode + resize 2.07e-2, 1.09e-5 (nvJPEG's chroma; the random-weight demo model is touchy). The CPU
# decode is exact, so there both rows are the resize's.
MODEL_MAP_MAX = {("cpu", "resize"): 2e-3, ("cpu", "decode+resize"): 2e-3,
                 ("cuda", "resize"): 2e-3, ("cuda", "decode+resize"): 4e-2}
MODEL_SCORE_MAX = {("cpu", "resize"): 1.5e-6, ("cpu", "decode+resize"): 1.5e-6,
                   ("cuda", "resize"): 1.5e-6, ("cuda", "decode+resize"): 2.5e-5}
# |grounding_input - HF processor| (torchvision's uint8 kernel on the CPU): one grey level is 1 / 255 /
# 0.224 = 0.0175. Measured max 0.0175 on CPU, 0.0350 on CUDA (300x400 upscaled); mean <= 1.6e-4.
GROUNDING_MAX = {"cpu": 0.0350, "cuda": 0.0525}
GROUNDING_MEAN = {"cpu": 4e-4, "cuda": 4e-4}

def _dev(device: str) -> str:
    return device.split(":")[0]


def _jpeg(rgb: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", **({"quality": 90} | kwargs))
    return buf.getvalue()


def _bogus_huffman(data: bytes) -> bytes:
    """A complete JPEG whose first Huffman table is invalid: PIL reads its header, no decoder its pixels."""
    out = bytearray(data)
    at = out.find(b"\xff\xc4")
    out[at + 5:at + 21] = b"\xff" * 16  # 16 x 255 codes of each length: no valid table has that many
    return bytes(out)


def _png_bomb_header() -> bytes:
    """A PNG whose header claims 60000 x 60000 pixels, and no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


# --- decode ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_jpegs_decode_like_pil_in_one_batch(device: str) -> None:
    images = [photo_like(1000, 1500, seed=1), photo_like(866, 1155, seed=2), synthetic_image(241, 319)]
    datas = [_jpeg(images[0]), _jpeg(images[1], subsampling=0), _jpeg(images[2], progressive=True)]
    datas.append(_jpeg(images[2][..., 0]))  # grayscale
    decoded = gi.decode_images(datas, device, MAX_PIXELS)
    stats = []
    for data, out in zip(datas, decoded, strict=True):
        ref = decode_image(data, MAX_PIXELS)
        assert isinstance(out, torch.Tensor) and out.device.type == _dev(device)
        assert out.dtype == torch.uint8 and out.is_contiguous() and tuple(out.shape) == ref.shape
        diff = np.abs(out.cpu().numpy().astype(np.int16) - ref)
        stats.append((diff.max(), diff.mean()))
        print(f"decode {ref.shape} on {device}: max {diff.max()} mean {diff.mean():.4f}")
    assert all(mean < 1.0 and mean <= DECODE_MEAN[_dev(device)] and top <= DECODE_MAX[_dev(device)]
               for top, mean in stats)


@pytest.mark.parametrize("device", DEVICES)
def test_what_the_device_does_not_decode_goes_back_to_the_cpu_path(device: str) -> None:
    rgb = photo_like(300, 400, seed=4)
    good = _jpeg(rgb)
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    fallbacks = {
        "png": encode_image(rgb, "PNG"),
        "truncated": good[: len(good) // 2],  # no EOI: never a half-grey picture
        "cmyk": cmyk.getvalue(),  # PIL's CMYK conversion is the CPU path's definition
        "bogus_huffman": _bogus_huffman(good),  # the decoder raises: retried alone, then left to PIL
    }
    for name, data in fallbacks.items():
        assert gi.decode_images([data], device, MAX_PIXELS) == [None], name
    with pytest.raises(ImageDecodeError):
        decode_image(fallbacks["truncated"], MAX_PIXELS)  # ... which refuses it


@pytest.mark.parametrize("device", DEVICES)
def test_header_refusals_are_probe_images_errors(device: str) -> None:
    refused = {
        "not_an_image": b"%PDF-1.7 this is not a picture",
        "empty": b"",
        "too_small": _jpeg(np.zeros((1, 1, 3), np.uint8)),
        "over_max_pixels": _jpeg(photo_like(300, 400)),  # 120000 pixels against a limit of 100000
        "bomb_header": _png_bomb_header(),
    }
    for name, data in refused.items():
        with pytest.raises(ImageDecodeError) as probe:
            probe_image(data, 100_000)
        (out,) = gi.decode_images([data], device, 100_000)
        assert isinstance(out, ImageDecodeError) and out.code == probe.value.code, name
    assert probe.value.code == "decompression_bomb"


@pytest.mark.parametrize("device", DEVICES)
def test_a_mixed_batch_keeps_its_order(device: str) -> None:
    a, b = photo_like(300, 400, seed=5), photo_like(240, 320, seed=6)
    datas = [_jpeg(a), b"junk", encode_image(a, "PNG"), _bogus_huffman(_jpeg(b)), _jpeg(b),
             _jpeg(b)[:-500], _png_bomb_header()]
    out = gi.decode_images(datas, device, MAX_PIXELS)
    assert [type(o).__name__ for o in out] == ["Tensor", "ImageDecodeError", "NoneType", "NoneType", "Tensor",
                                               "NoneType", "ImageDecodeError"]
    assert [o.code for o in out if isinstance(o, ImageDecodeError)] == ["not_an_image", "decompression_bomb"]
    assert tuple(out[0].shape) == a.shape and tuple(out[4].shape) == b.shape
    assert gi.decode_images([], device, MAX_PIXELS) == []


def test_a_decoder_failure_is_retried_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the batched call raises, only the image the decoder refuses alone is left to the CPU path."""
    real = gi.decode_jpeg
    calls: list[int] = []

    def flaky(data, **kwargs):
        batch = data if isinstance(data, list) else [data]
        calls.append(len(batch))
        if any(t.numpy().tobytes() == poison for t in batch):
            raise RuntimeError("simulated decoder failure")
        return real(data, **kwargs)

    datas = [_jpeg(photo_like(200, 300, seed=s)) for s in range(3)]
    poison = datas[1]
    monkeypatch.setattr(gi, "decode_jpeg", flaky)
    out = gi.decode_images(datas, "cpu", MAX_PIXELS)
    assert calls == [3, 1, 1, 1]
    assert isinstance(out[0], torch.Tensor) and out[1] is None and isinstance(out[2], torch.Tensor)


# --- CLIP input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("h", "w", "size"), [(1000, 1500, 518), (1500, 1000, 518), (1944, 2592, 518),
                                              (300, 400, 518), (866, 1155, 224), (518, 700, 518)])
def test_clip_input_matches_open_clips_preprocess(device: str, h: int, w: int, size: int) -> None:
    from models.clip_backbone import make_preprocess

    rgb = photo_like(h, w, seed=h + w)
    ref = make_preprocess(size)(Image.fromarray(rgb))
    out = gi.clip_input(torch.from_numpy(rgb).to(device), size)
    assert out.dtype == torch.float32 and out.device.type == _dev(device) and out.shape == ref.shape
    diff = (out.cpu() - ref).abs()
    print(f"clip {h}x{w}->{size} on {device}: max {diff.max():.4f} mean {diff.mean():.2e}")
    assert diff.max() <= CLIP_MAX[_dev(device)] and diff.mean() <= CLIP_MEAN[_dev(device)]


@pytest.fixture(scope="module")
def demo_engine():
    from service.engine.pipeline import InspectionEngine
    from service.settings import FiloSettings

    return InspectionEngine.from_settings(FiloSettings(profile="demo", device="cpu", grounding=False))


@pytest.mark.parametrize("device", DEVICES)
def test_device_inputs_change_the_models_answer_by_little(demo_engine, device: str) -> None:
    """The demo model's map and score from device inputs against the CPU path, for one 1500x1000 JPEG:
    the device resize of the CPU-decoded pixels, then the device decode and resize. The bounds,
    MODEL_MAP_MAX / MODEL_SCORE_MAX, are about twice what was measured (figures beside them)."""
    from service.core.types import InspectRequest

    data = _jpeg(photo_like(1000, 1500, seed=7))
    rgb = decode_image(data, MAX_PIXELS)
    (on_device,) = gi.decode_images([data], device, MAX_PIXELS)
    size = demo_engine.image_size
    reqs = [InspectRequest(rgb, "bottle", grounding=False),  # the CPU path: PIL decode, PIL resize
            InspectRequest(rgb, "bottle", grounding=False,
                           pixels=gi.clip_input(torch.from_numpy(rgb).to(device), size).cpu()),
            InspectRequest(rgb, "bottle", grounding=False, pixels=gi.clip_input(on_device, size).cpu())]
    base, *others = demo_engine.inspect_batch(reqs)
    for kind, res in zip(("resize", "decode+resize"), others, strict=True):
        map_diff = float(np.abs(base.anomaly_map - res.anomaly_map).max())
        score_diff = abs(base.score - res.score)
        print(f"model, device {kind} on {device}: max |map diff| {map_diff:.2e}, |score diff| {score_diff:.2e}")
        assert map_diff <= MODEL_MAP_MAX[_dev(device), kind] and score_diff <= MODEL_SCORE_MAX[_dev(device), kind]


# --- Grounding DINO input ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector():
    from models.grounding.detector import GroundingDetector

    return GroundingDetector.tiny()


@pytest.mark.parametrize(("h", "w"), [(1000, 1500), (1500, 1000), (518, 700), (517, 2000), (200, 3000),
                                      (3000, 150), (20, 1400), (1333, 1333), (300, 400), (1944, 2592)])
def test_grounding_size_is_the_processors(detector, h: int, w: int) -> None:
    rgb = np.zeros((h, w, 3), np.uint8)
    assert gi.grounding_size(h, w) == tuple(detector.preprocess(rgb).shape[-2:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("h", "w"), [(1000, 1500), (1500, 1000), (1944, 2592), (300, 400), (200, 3000)])
def test_grounding_input_matches_the_processor(detector, device: str, h: int, w: int) -> None:
    rgb = photo_like(h, w, seed=h * 3 + w)
    ref = detector.preprocess(rgb)
    out = gi.grounding_input(torch.from_numpy(rgb).to(device))
    assert out.dtype == torch.float32 and out.device.type == _dev(device) and out.shape == ref.shape
    diff = (out.cpu() - ref).abs()
    print(f"grounding {h}x{w} on {device}: max {diff.max():.4f} mean {diff.mean():.2e}")
    assert diff.max() <= GROUNDING_MAX[_dev(device)] and diff.mean() <= GROUNDING_MEAN[_dev(device)]


def test_inputs_refuse_what_is_not_an_hwc_uint8_image() -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        gi.clip_input(torch.zeros(3, 64, 64, dtype=torch.uint8), 32)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        gi.grounding_input(torch.zeros(64, 64, 3))


# --- overlay and JPEG ---------------------------------------------------------------------------------------------


def smooth_map(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 6)
    return ((m - m.min()) / (m.max() - m.min())).astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("h", "w", "size", "heatmap_size"), [
    (1000, 1500, 518, 768), (1500, 1000, 518, 768), (1944, 2592, 518, 768), (866, 1155, 224, 768),
    (600, 800, 518, 500), (1944, 2592, 518, 1000), (1000, 1500, 518, "original"), (518, 518, 518, "frame"),
    (300, 400, 518, "original"),
])
def test_overlay_is_fast_overlay_within_rounding(device: str, h: int, w: int, size: int, heatmap_size) -> None:
    """Measured, CPU and CUDA alike: mean |diff| <= 0.103 grey levels, 99th percentile 1, max 3 (8-bit
    rounding of OpenCV's fixed-point shrink, and JET steps where the map value's truncation flips)."""
    rgb = photo_like(h, w, seed=h + w)
    amap = smooth_map(size, seed=h)
    out_hw = output_hw((h, w), heatmap_size, size)
    boxes = [(100.0, 50.0, 400.0, 300.0), (w * 0.6, h * 0.5, w * 0.9, h * 0.95), (-20.0, h - 30.0, 60.0, h + 9.0)]
    ref = fast_overlay(rgb, amap, out_hw, boxes)
    out = gi.overlay(torch.from_numpy(rgb).to(device), torch.from_numpy(amap).to(device), out_hw, boxes)
    assert out.dtype == torch.uint8 and out.device.type == _dev(device) and tuple(out.shape) == ref.shape
    diff = np.abs(out.cpu().numpy().astype(np.int16) - ref)
    p99 = np.percentile(diff, 99)
    print(f"overlay {h}x{w}->{out_hw} on {device}: mean {diff.mean():.3f} p99 {p99} max {diff.max()}")
    assert diff.mean() < 0.25 and p99 <= 1 and diff.max() <= 4


@pytest.mark.parametrize("device", DEVICES)
def test_boxes_are_opencvs_rectangles_pixel_for_pixel(device: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        boxes = [tuple(rng.uniform(-10, 90, 4)) for _ in range(3)]  # reversed, degenerate, off the edges
        ref = np.zeros((60, 80, 3), np.uint8)
        cv2.rectangle(ref, (2, 2), (3, 3), (9, 9, 9), -1)  # something under the lines
        out = torch.from_numpy(ref.copy()).to(device)
        draw_boxes(ref, boxes)
        gi._draw_boxes(out, boxes)
        np.testing.assert_array_equal(out.cpu().numpy(), ref, err_msg=str(boxes))


def test_the_colour_table_is_opencvs_jet() -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ref = cv2.cvtColor(cv2.applyColorMap(values, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    lut = gi.jet_lut(torch.device("cpu"))
    np.testing.assert_array_equal(lut[torch.from_numpy(values).long()].numpy(), ref)
    assert gi.jet_lut(torch.device("cpu")) is lut  # built once per device


@pytest.mark.parametrize("device", DEVICES)
def test_encode_jpeg_is_the_cpu_encoders_jpeg(device: str) -> None:
    """On CPU the bytes are OpenCV's (both libjpeg-turbo, quality 85, 4:2:0). nvJPEG (CUDA) encodes 4:4:4:
    measured 51014 bytes against 36962, round-trip error 2.41 grey levels mean against 2.57 (this grainy
    photo-like image), so the bounds are: error at most 10% above the CPU encoder's, size at most 1.5x."""
    rgb = photo_like(512, 768, seed=8)
    data = gi.encode_jpeg(torch.from_numpy(rgb).to(device), quality=85)
    ref = encode_jpeg(rgb, 85)
    back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert isinstance(data, bytes) and back.shape == rgb.shape
    err = np.abs(back.astype(np.int16) - rgb).mean()
    ref_err = np.abs(np.asarray(Image.open(io.BytesIO(ref)).convert("RGB")).astype(np.int16) - rgb).mean()
    print(f"jpeg on {device}: {len(data)} bytes (cpu {len(ref)}), mean |diff| {err:.3f} (cpu {ref_err:.3f})")
    if _dev(device) == "cpu":
        assert data == ref
    assert err <= 1.1 * ref_err and len(data) <= 1.5 * len(ref)
