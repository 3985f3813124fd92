"""The serving steps around an engine batch, shared by the queue worker and the embedded server: uploads
decoded (on the model's device when `FILO_GPU_IMAGE_PATH` is on), prepared into model input, and each result's
heatmap rendered with its valid boxes. Both callers run exactly these steps, so the two modes answer alike.

One home for the choice between the CPU path (`service/core/imaging.py`, the default and the contract: it
is the released preprocessing) and the device path (`service/engine/gpu_imaging.py`: nvJPEG decode, resize and
overlay on the GPU). An engine image is then either an HxWx3 uint8 numpy array (CPU path) or the same as a
tensor on the device; `InspectionEngine.prepare` takes either, and `render` draws either. PNG and whatever
nvJPEG refuses take the CPU path per image. A failure to decode comes back in the image's own slot as the
`ImageDecodeError` (`service.core.errors.image_error` says what it means for the caller); a failure to
prepare is left to the engine, which meets it again in the batch and fails that request alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.core.imaging import Heatmap, HeatmapSpec, ImageDecodeError, decode_image, render_heatmap
from service.core.types import InspectRequest, InspectResult
from service.engine.contract import Engine

# np.ndarray or a torch.Tensor on the device; torch is imported only where a device image exists, so that
# the API process (which imports the backends) stays free of it
EngineImage = Any


def uses_device_path(enabled: bool, device: Any) -> bool:
    """The device path runs where it pays and is supported: the setting on and a CUDA engine."""
    return bool(enabled) and str(device).startswith("cuda")


def decode_uploads(datas: Sequence[bytes], max_pixels: int, device: Any | None) -> list[EngineImage | ImageDecodeError]:
    """Decode a batch of uploads: on `device` (one batched nvJPEG call) where given and possible, else on the
    CPU. A slot holds the image or the `ImageDecodeError` the header checks or the decoder raised."""
    out: list[EngineImage | ImageDecodeError | None] = [None] * len(datas)
    if device is not None:
        from service.engine import gpu_imaging

        out = list(gpu_imaging.decode_images(datas, device, max_pixels))
    for i, data in enumerate(datas):
        if out[i] is None:
            try:
                out[i] = decode_image(data, max_pixels)
            except ImageDecodeError as exc:
                out[i] = exc
    return out  # type: ignore[return-value]


def image_hw(image: EngineImage) -> tuple[int, int]:
    return int(image.shape[0]), int(image.shape[1])


def render(image: EngineImage, anomaly_map: np.ndarray, spec: HeatmapSpec,
           boxes: list[tuple[float, float, float, float]] | None = None,
           boxes_frame: list[tuple[float, float, float, float]] | None = None) -> Heatmap:
    """`service.core.imaging.render_heatmap` for an engine image: the JPEG overlay at a given or the original
    size is drawn and encoded on the device for a device image; every other kind on the CPU."""
    if isinstance(image, np.ndarray):
        return render_heatmap(image, anomaly_map, spec, boxes, boxes_frame)
    if spec.format != "jpeg" or spec.size == "frame":
        return render_heatmap(image.cpu().numpy(), anomaly_map, spec, boxes, boxes_frame)
    import torch

    from service.core.imaging import JPEG_QUALITY, output_hw
    from service.engine import gpu_imaging

    h, w = output_hw(image_hw(image), spec.size, anomaly_map.shape[0])
    values = torch.from_numpy(anomaly_map).to(image.device, non_blocking=False)
    rgb = gpu_imaging.overlay(image, values, (h, w), boxes)
    return Heatmap("image/jpeg", w, h, "overlay", gpu_imaging.encode_jpeg(rgb, JPEG_QUALITY))


def decode_for(engine: Engine, datas: Sequence[bytes], max_pixels: int, gpu_image_path: bool
               ) -> list[EngineImage | ImageDecodeError]:
    """`decode_uploads` on the engine's device where the GPU image path is on and pays, else on the CPU."""
    on_device = uses_device_path(gpu_image_path, engine.device)
    return decode_uploads(datas, max_pixels, engine.device if on_device else None)


def prepared(engine: Engine, request: InspectRequest) -> InspectRequest:
    """The request with its model input attached; as it was where preparing fails (the engine meets the same
    failure in the batch and reports it for this request alone)."""
    try:
        return engine.prepare(request)
    except Exception:
        return request


def result_heatmap(image: EngineImage, result: InspectResult, spec: HeatmapSpec) -> Heatmap | None:
    """The heatmap a request asked for (None: it asked for none), with the result's valid boxes drawn."""
    if not spec.wanted:
        return None
    valid = [b for b in result.boxes if b.valid]
    return render(image, result.anomaly_map, spec, [(b.x1, b.y1, b.x2, b.y2) for b in valid], [b.frame for b in valid])
