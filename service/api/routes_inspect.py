"""POST /v1/inspect: parse and validate, hand to the backend, shape the answer. No logic beyond that."""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service.api.auth import require_api_key
from service.api.deps import BackendDep, SettingsDep
from service.api.errors import IMAGE_ERROR_STATUS, CategoryNotFoundError, ServiceError, validation_body
from service.api.schemas import ERROR_RESPONSES, InspectJSON, InspectParams, InspectResponse
from service.backends import InspectJob, InspectOutcome
from service.imaging import ImageDecodeError, decode_image, heatmap_png
from service.types import Box

router = APIRouter(prefix="/v1", tags=["inspection"])

_FORM_SCHEMA = {
    "type": "object",
    "required": ["image", "category"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "the image file"},
        "category": {"type": "string"},
        "top_k": {"type": "integer", "minimum": 1, "maximum": 100},
        "grounding": {"type": "boolean"},
        "heatmap": {"type": "string", "enum": ["png", "none"], "default": "png"},
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
        "description": "the inspection; with `Accept: image/png`, the heatmap PNG itself",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    },
}


def _invalid(errors: Any) -> ServiceError:
    body = validation_body(errors)["error"]
    return ServiceError(422, "validation_error", body["message"], details={"fields": body["fields"]})


async def _read_body(request: Request) -> tuple[bytes, InspectParams]:
    """The image bytes and parameters, from multipart or JSON; anything else is 415."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        async with request.form() as form:  # closes the spooled upload files afterwards
            image = form.get("image")
            fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str) and v != ""}
            try:
                params = InspectParams.model_validate(fields)
            except ValidationError as exc:
                raise _invalid(exc.errors()) from None
            if not isinstance(image, UploadFile):
                raise _invalid([{"loc": ("image",), "msg": "a file part named 'image' is required"}])
            return await image.read(), params
    if ctype == "application/json" or ctype.endswith("+json"):
        try:
            body = InspectJSON.model_validate_json(await request.body())
        except ValidationError as exc:
            raise _invalid(exc.errors()) from None
        try:
            data = base64.b64decode(body.image_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ServiceError(422, "invalid_base64", "image_base64 is not valid base64") from None
        return data, InspectParams.model_validate(body.model_dump(exclude={"image_base64"}))
    raise ServiceError(415, "unsupported_media_type",
                       f"send multipart/form-data or application/json, not {ctype or 'no content type'!r}")


async def _decode(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        return await anyio.to_thread.run_sync(decode_image, data, max_pixels)
    except ImageDecodeError as exc:
        raise ServiceError(IMAGE_ERROR_STATUS.get(exc.code, 422), exc.code, exc.message) from None


def _wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    return "image/png" in accept and "application/json" not in accept


async def _heatmap(image: np.ndarray, outcome: InspectOutcome) -> bytes:
    boxes = [(b.x1, b.y1, b.x2, b.y2) for b in outcome.result.boxes if b.valid]
    return await anyio.to_thread.run_sync(lambda: heatmap_png(image, outcome.result.anomaly_map, boxes=boxes))


def _box_out(box: Box, width: int, height: int) -> dict[str, Any]:
    """A box in original pixels, clipped to the image (a detector may reach a little past its edge)."""
    return {
        "x1": min(max(box.x1, 0.0), width), "y1": min(max(box.y1, 0.0), height),
        "x2": min(max(box.x2, 0.0), width), "y2": min(max(box.y2, 0.0), height),
        "phrase": box.phrase, "confidence": box.confidence, "valid": box.valid,
    }


@router.post(
    "/inspect",
    summary="Inspect one image",
    response_model=InspectResponse,
    responses=_RESPONSES,
    openapi_extra=_OPENAPI_EXTRA,
    dependencies=[Depends(require_api_key)],
)
async def inspect(
    request: Request,
    settings: SettingsDep,
    backend: BackendDep,
) -> Response:
    """Score one image of a registered category; multipart (`image` file) or JSON (`image_base64`)."""
    t0 = time.monotonic()
    data, params = await _read_body(request)
    if not params.category:
        raise CategoryNotFoundError(None, [c.name for c in await backend.list_categories()])
    image = await _decode(data, settings.max_image_pixels)
    png = _wants_png(request)
    job = InspectJob(
        request_id=uuid.uuid4().hex,
        category=params.category,
        image=image,
        image_bytes=data,
        top_k=params.top_k or settings.top_k,
        grounding=params.grounding,
        want_map=png or params.heatmap == "png",
        deadline=t0 + settings.request_timeout_s,
    )
    outcome = await backend.inspect(job)
    heat = await _heatmap(image, outcome) if job.want_map else None
    headers = {"X-Request-Id": job.request_id}
    if png:
        assert heat is not None
        return Response(heat, media_type="image/png", headers=headers)
    threshold = settings.thresholds.get(job.category, settings.default_threshold)
    result = outcome.result
    body = InspectResponse(
        request_id=job.request_id,
        category=job.category,
        score=result.score,
        is_anomalous=result.score >= threshold,
        threshold=threshold,
        position=result.position,
        boxes=[_box_out(b, image.shape[1], image.shape[0]) for b in result.boxes],
        top_types=[{"description": t.description, "similarity": t.similarity} for t in result.top_types],
        heatmap_png=base64.b64encode(heat).decode() if heat is not None else None,
        model=outcome.model,
        timing_ms={"queue_wait": outcome.queue_wait_ms, "model": outcome.model_ms,
                   "total": (time.monotonic() - t0) * 1e3},
    )
    return JSONResponse(body.model_dump(mode="json"), headers=headers)
