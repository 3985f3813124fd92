"""Normal reference images of a category, and its calibrated threshold (docs/few-shot.md).

PUT/GET/DELETE /v1/categories/{name}/references[/{id}] and POST /v1/categories/{name}/calibrate.
Writes need the admin key; the listing any key (a key limited to categories: its own categories' only).
References are stored beside the category in the durable catalog (Redis in queue mode, `state_dir` in
embedded mode: service/catalog/references.py), so every worker, restart and new pod has them; each process
builds its own patch memory from them with its model.

These routes read the multipart uploads and answer; the work is service/workflows/references.py's.
Calibration inspects the labelled images through the ordinary inspection path (so in queue mode the workers
score them with the category's current references), then stores the F1-max cut of
`service.catalog.thresholds` (the labelled rule `filo calibrate` uses too); with no images it stores the
references rule, which the engine evaluates from the references' leave-one-out scores.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from service.api.auth import Admin, Catalog
from service.api.body import media_type
from service.api.deps import BackendDep, SettingsDep
from service.api.params import NameParam
from service.api.schemas import ERROR_RESPONSES, IMAGE_RULES
from service.core.errors import ServiceError, image_error
from service.core.imaging import ImageDecodeError, decode_image
from service.workflows import references
from service.workflows.category_state import require_category

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/categories", tags=["references"])

_IMAGE_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
_MULTIPART_IMAGES = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["images"],
        "properties": {"images": {**_IMAGE_FILES, "minItems": 1,
                                  "description": f"one file part per normal image: {IMAGE_RULES}"}}}}}}
}
_MULTIPART_LABELLED = {
    "requestBody": {"required": False, "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "description": "labelled images, at least one of each kind; or no images at all (the references rule)",
        "properties": {"good": {**_IMAGE_FILES, "description": f"normal images: {IMAGE_RULES}"},
                       "defective": {**_IMAGE_FILES, "description": f"anomalous images: {IMAGE_RULES}"}},
        "anyOf": [
            {"properties": {"good": {"maxItems": 0}, "defective": {"maxItems": 0}}},
            {"required": ["good", "defective"],
             "properties": {"good": {"minItems": 1}, "defective": {"minItems": 1}}},
        ]}}}}
}


async def _read_parts(request: Request, fields: tuple[str, ...], max_pixels: int) -> dict[str, list[tuple[bytes, Any]]]:
    """The file parts named in `fields`, each fully decoded (a broken file refuses the whole request)."""
    ctype = media_type(request)
    if ctype != "multipart/form-data":
        if not (await request.body()):
            return {f: [] for f in fields}
        raise ServiceError(415, "unsupported_media_type", f"send multipart/form-data, not {ctype or 'no content type'!r}")
    out: dict[str, list[tuple[bytes, Any]]] = {f: [] for f in fields}
    async with request.form(max_files=10_000) as form:
        for key, value in form.multi_items():
            if key not in fields:
                continue
            if not isinstance(value, UploadFile):
                raise ServiceError(422, "validation_error", f"part {key!r} must be a file")
            data = await value.read()
            try:
                image = await anyio.to_thread.run_sync(decode_image, data, max_pixels)
            except ImageDecodeError as exc:
                err = image_error(exc)
                raise ServiceError(err.status, err.code, f"{key} part {value.filename or len(out[key]) + 1}: "
                                   f"{exc.message}; nothing of this request was stored") from None
            out[key].append((data, image))
    return out


# --- references -------------------------------------------------------------------------------------------


@router.put("/{name}/references", responses=ERROR_RESPONSES, openapi_extra=_MULTIPART_IMAGES)
async def put_references(name: NameParam, request: Request, backend: BackendDep, settings: SettingsDep,
                         who: Admin) -> dict:
    """Add normal reference images (file parts named `images`); answers what the category now holds."""
    await require_category(backend, name)
    parts = (await _read_parts(request, ("images",), settings.max_image_pixels))["images"]
    return await references.add(backend, settings, name, parts, who.name)


@router.get("/{name}/references", responses=ERROR_RESPONSES)
async def get_references(name: NameParam, backend: BackendDep, who: Catalog) -> dict:
    who.check_category(name)
    return await references.listing(backend, name)


@router.delete("/{name}/references", responses=ERROR_RESPONSES)
async def delete_references(name: NameParam, backend: BackendDep, who: Admin) -> dict:
    """Remove every reference: the category is zero-shot again (exactly)."""
    return await references.remove_all(backend, name, who.name)


@router.delete("/{name}/references/{ref_id}", responses=ERROR_RESPONSES)
async def delete_reference(name: NameParam, ref_id: str, backend: BackendDep, who: Admin) -> dict:
    return await references.remove(backend, name, ref_id, who.name)


_CALIBRATE_RESPONSES = {**ERROR_RESPONSES, 409: ERROR_RESPONSES[503] | {
    "description": "the images were scored by different model versions (a rolling deploy); calibrate again"}}


@router.post("/{name}/calibrate", responses=_CALIBRATE_RESPONSES, openapi_extra=_MULTIPART_LABELLED)
async def calibrate(name: NameParam, request: Request, backend: BackendDep, settings: SettingsDep,
                    who: Admin) -> dict:
    """Set the category's threshold: F1-max on labelled images (`good` and `defective` file parts), or,
    with no images, from its normal references (needs at least 2; docs/few-shot.md gives the rule)."""
    await require_category(backend, name)
    parts = await _read_parts(request, ("good", "defective"), settings.max_image_pixels)
    return await references.calibrate(backend, settings, name, parts["good"], parts["defective"], who.name)
