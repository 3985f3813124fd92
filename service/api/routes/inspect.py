"""POST /v1/inspect: parse and validate, run the inspect workflow, shape the answer. No logic beyond that: the
verdict is the engine's, and the record (and any other sink) is fed by the workflow (service/workflows/).

Validation here is the image header (format, size, the pixel limit) in queue mode: the worker
decodes the image, once, and refuses truncated files before they join a batch; it also renders the
heatmap, so this process never touches pixels. Embedded mode decodes here (it is its own worker).
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service.api.auth import Inspector
from service.api.body import invalid, is_json, media_type, parse_json
from service.api.deps import BackendDep, SettingsDep, SinksDep
from service.api.schemas import (
    ERROR_RESPONSES,
    IMAGE_RULES,
    MAX_HEATMAP_SIDE,
    PART_ID_PATTERN,
    REQUEST_ID_PATTERN,
    InspectJSON,
    InspectParams,
    InspectResponse,
)
from service.backends.base import InspectJob
from service.core.errors import CategoryNotFoundError, ServiceError, image_error
from service.core.finished import FinishedInspection
from service.core.imaging import (
    DEFAULT_HEATMAP_FORMAT,
    DEFAULT_HEATMAP_SIZE,
    HeatmapSpec,
    ImageDecodeError,
    ImageInfo,
    decode_image,
    probe_image,
)
from service.workflows import inspection

router = APIRouter(prefix="/v1", tags=["inspection"])

_FORM_SCHEMA = {
    "type": "object",
    "required": ["image", "category"],
    "additionalProperties": False,
    "properties": {
        "image": {"type": "string", "format": "binary", "description": f"the image file: {IMAGE_RULES}"},
        "category": {"type": "string", "minLength": 1, "description": "registered category (see GET /v1/categories)"},
        "top_k": {"type": "integer", "minimum": 1, "maximum": 100},
        "grounding": {"type": "boolean"},
        "heatmap": {"type": "string", "enum": ["jpeg", "png", "map", "none"], "default": DEFAULT_HEATMAP_FORMAT},
        "heatmap_size": {"description": "'original', 'frame' or the largest long side in pixels",
                         "oneOf": [{"type": "string", "enum": ["original", "frame"]},
                                   {"type": "integer", "minimum": 16, "maximum": MAX_HEATMAP_SIDE}],
                         "default": DEFAULT_HEATMAP_SIZE},
        "source": InspectParams.model_json_schema()["properties"]["source"],
        "record": {"type": "boolean", "default": True, "description": "keep a record of this inspection"},
        "part_id": {"type": "string", "pattern": PART_ID_PATTERN,
                    "description": InspectParams.model_fields["part_id"].description},
        "request_id": {"type": "string", "pattern": REQUEST_ID_PATTERN,
                       "description": InspectParams.model_fields["request_id"].description},
        "deadline_ms": {"type": "integer", "minimum": 1, "maximum": 600_000,
                        "description": InspectParams.model_fields["deadline_ms"].description},
    },
}

_OPENAPI_EXTRA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _FORM_SCHEMA},
            "application/json": {"schema": InspectJSON.model_json_schema(ref_template="#/components/schemas/{model}")},
        },
    }
}

_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {
        "description": "the inspection; with `Accept: image/png`, the PNG heatmap itself (overlay, or the map "
        "with heatmap=map; original size unless heatmap_size says otherwise)",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    },
}


async def _read_body(request: Request) -> tuple[bytes, InspectParams]:
    """The image bytes and parameters, from multipart or JSON; anything else is 415."""
    ctype = media_type(request)
    if ctype == "multipart/form-data":
        async with request.form() as form:  # closes the spooled upload files afterwards
            image = form.get("image")
            fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str) and v != ""}
            errors: list[Any] = []
            if not isinstance(image, UploadFile):
                errors.append({"loc": ("image",), "msg": "a file part named 'image' is required", "type": "missing"})
            try:
                params = InspectParams.model_validate(fields)
            except ValidationError as exc:
                errors = list(exc.errors()) + errors
            if errors:
                raise invalid(errors)
            assert isinstance(image, UploadFile)
            return await image.read(), params
    if is_json(ctype):
        body = parse_json(InspectJSON, await request.body())
        try:
            data = base64.b64decode(body.image_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ServiceError(422, "invalid_base64", "image_base64 is not valid base64") from None
        return data, InspectParams.model_validate(body.model_dump(exclude={"image_base64"}))
    raise ServiceError(415, "unsupported_media_type",
                       f"send multipart/form-data or application/json, not {ctype or 'no content type'!r}")


async def _validate_image(data: bytes, max_pixels: int, decode: bool) -> tuple[ImageInfo, np.ndarray | None]:
    """The header always (microseconds, on the loop); the pixels only where this process runs the model."""
    try:
        info = probe_image(data, max_pixels)
        return info, (await anyio.to_thread.run_sync(decode_image, data, max_pixels) if decode else None)
    except ImageDecodeError as exc:
        raise image_error(exc) from None


def _wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return "image/png" in accept and "application/json" not in accept


def _heatmap_spec(params: InspectParams, png_body: bool) -> HeatmapSpec:
    """`Accept: image/png` answers with PNG bytes: the overlay (or the map with heatmap=map), at the
    original size as it always did unless `heatmap_size` was given."""
    if not png_body:
        return HeatmapSpec(params.heatmap, params.heatmap_size)
    size = params.heatmap_size if "heatmap_size" in params.model_fields_set else "original"
    return HeatmapSpec("map" if params.heatmap == "map" else "png", size)


@router.post(
    "/inspect",
    summary="Inspect one image",
    response_model=InspectResponse,
    responses=_RESPONSES,
    openapi_extra=_OPENAPI_EXTRA,
)
async def inspect(
    request: Request,
    settings: SettingsDep,
    backend: BackendDep,
    sinks: SinksDep,
    who: Inspector,
) -> Response:
    """Score one image of a registered category; multipart (`image` file) or JSON (`image_base64`)."""
    t0 = time.monotonic()
    data, params = await _read_body(request)
    who.check_inspection(params.category, params.source)  # a limited key: its own categories and sources
    info, image = await _validate_image(data, settings.max_image_pixels, backend.decodes_in_process)
    png = _wants_png(request)
    asked = _heatmap_spec(params, png)
    wait_s = settings.request_timeout_s if params.deadline_ms is None \
        else min(settings.request_timeout_s, params.deadline_ms / 1000)
    job = InspectJob(
        request_id=params.request_id or uuid.uuid4().hex,
        category=params.category,
        image=image,
        image_bytes=data,
        top_k=params.top_k or settings.top_k,
        grounding=params.grounding,
        heatmap=asked,
        deadline=t0 + wait_s,
    )
    try:
        finished = await inspection.inspect(backend, sinks, job, info, t0, params.source, params.record,
                                            part_id=params.part_id, key_name=who.name)
    except CategoryNotFoundError as exc:  # a limited key is told of its own categories only
        known = exc.details.get("known_categories", [])
        raise CategoryNotFoundError(params.category, [n for n in known if who.reaches_category(n)]) from None
    headers = {"X-Request-Id": job.request_id}
    if png:
        if finished.heatmap is None:
            raise ServiceError(500, "inspection_failed", "the worker returned no heatmap")
        return Response(finished.heatmap.data, media_type=finished.heatmap.media_type, headers=headers)
    return JSONResponse(_answer(finished, asked.wanted, params.heatmap == "png"), headers=headers)


def _answer(finished: FinishedInspection, show_heatmap: bool, legacy_png: bool) -> dict[str, Any]:
    """The JSON answer, shaped from the finished inspection every sink saw (the verdict is the engine's)."""
    result = finished.result
    shown = finished.heatmap if show_heatmap else None
    b64 = base64.b64encode(shown.data).decode() if shown is not None else None
    return InspectResponse(
        request_id=finished.request_id,
        category=finished.category,
        part_id=finished.part_id,
        score=result.score,
        is_anomalous=result.is_anomalous,
        needs_review=result.needs_review,
        threshold=result.threshold,
        threshold_source=result.threshold_source,
        references=result.references,
        position=result.position,
        boxes=finished.boxes(),
        top_types=finished.top_types(),
        heatmap={**shown.meta(), "base64": b64} if shown is not None else None,
        heatmap_png=b64 if shown is not None and legacy_png else None,
        model=finished.model,
        timing_ms=finished.timing_ms,
    ).model_dump(mode="json")
