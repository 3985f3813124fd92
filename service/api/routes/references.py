"""Normal reference images of a category, and its calibrated threshold (docs/few-shot.md).

PUT/GET/DELETE /v1/categories/{name}/references[/{id}] and POST /v1/categories/{name}/calibrate.
Writes need the admin key. References are stored beside the category in the durable catalog
(Redis in queue mode, `state_dir` in embedded mode: service/catalog/references.py), so every worker,
restart and new pod has them; each process builds its own patch memory from them with its model.

Calibration inspects the labelled images through the ordinary inspection path (`backend.inspect`,
so in queue mode the workers score them with the category's current references), then stores the
F1-max cut of `service.catalog.thresholds` (the labelled rule `filo calibrate` uses too); with no images
it stores the references rule, which the engine evaluates from the references' leave-one-out scores.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from service.api.auth import Admin, require_api_key
from service.api.body import media_type
from service.api.category_extras import (
    current_threshold,
    load_refs,
    load_threshold,
    note_threshold_change,
    refresh_reference_threshold,
    replace_refs,
    require_category,
    score_image,
    store_extra,
    store_threshold,
)
from service.api.deps import BackendDep, SettingsDep
from service.api.params import NameParam
from service.api.schemas import ERROR_RESPONSES, IMAGE_RULES
from service.catalog.references import (
    THRESHOLD_KIND,
    ReferenceImage,
    ReferenceSet,
)
from service.catalog.thresholds import LabelledScores, ThresholdRecord
from service.core.errors import IMAGE_ERROR_STATUS, ServiceError
from service.core.imaging import ImageDecodeError, decode_image

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


async def _refs_body(backend: Any, name: str, refs: ReferenceSet) -> dict[str, Any]:
    return {"category": name, "references": len(refs), "items": [im.item() for im in refs.images],
            "memory_bytes": await backend.reference_memory_bytes(name) if len(refs) else 0}


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
                raise ServiceError(IMAGE_ERROR_STATUS.get(exc.code, 422), exc.code,
                                   f"{key} part {value.filename or len(out[key]) + 1}: {exc.message}; "
                                   "nothing of this request was stored") from None
            out[key].append((data, image))
    return out


# --- references -------------------------------------------------------------------------------------------


@router.put("/{name}/references", responses=ERROR_RESPONSES, openapi_extra=_MULTIPART_IMAGES)
async def put_references(name: NameParam, request: Request, backend: BackendDep, settings: SettingsDep,
                         who: Admin) -> dict:
    """Add normal reference images (file parts named `images`); answers what the category now holds."""
    await require_category(backend, name)
    parts = (await _read_parts(request, ("images",), settings.max_image_pixels))["images"]
    if not parts:
        raise ServiceError(422, "validation_error", "send one or more file parts named 'images'")
    refs = await load_refs(backend, name)
    new = refs.added(ReferenceImage.from_bytes(data, img.shape[1], img.shape[0]) for data, img in parts)
    if len(new) > settings.reference_max_images:
        raise ServiceError(413, "too_many_references",
                           f"category {name!r} would hold {len(new)} references; the maximum is "
                           f"{settings.reference_max_images} (FILO_REFERENCE_MAX_IMAGES); nothing was stored")
    applied = await replace_refs(backend, settings, name, new, who.name)
    return {**await _refs_body(backend, name, new), **applied}


@router.get("/{name}/references", responses=ERROR_RESPONSES, dependencies=[Depends(require_api_key)])
async def get_references(name: NameParam, backend: BackendDep) -> dict:
    await require_category(backend, name)
    return await _refs_body(backend, name, await load_refs(backend, name))


@router.delete("/{name}/references", responses=ERROR_RESPONSES)
async def delete_references(name: NameParam, backend: BackendDep, settings: SettingsDep, who: Admin) -> dict:
    """Remove every reference: the category is zero-shot again (exactly)."""
    await require_category(backend, name)
    await replace_refs(backend, settings, name, ReferenceSet(), who.name)
    return await _refs_body(backend, name, ReferenceSet())


@router.delete("/{name}/references/{ref_id}", responses=ERROR_RESPONSES)
async def delete_reference(name: NameParam, ref_id: str, backend: BackendDep, settings: SettingsDep,
                           who: Admin) -> dict:
    await require_category(backend, name)
    refs = await load_refs(backend, name)
    if ref_id not in refs.ids():
        raise ServiceError(404, "unknown_reference", f"category {name!r} has no reference {ref_id!r}",
                           details={"known": refs.ids()})
    left = refs.without(ref_id)
    await replace_refs(backend, settings, name, left, who.name)
    return await _refs_body(backend, name, left)


_CALIBRATE_RESPONSES = {**ERROR_RESPONSES, 409: ERROR_RESPONSES[503] | {
    "description": "the images were scored by different model versions (a rolling deploy); calibrate again"}}


@router.post("/{name}/calibrate", responses=_CALIBRATE_RESPONSES, openapi_extra=_MULTIPART_LABELLED)
async def calibrate(name: NameParam, request: Request, backend: BackendDep, settings: SettingsDep,
                    who: Admin) -> dict:
    """Set the category's threshold: F1-max on labelled images (`good` and `defective` file parts), or,
    with no images, from its normal references (needs at least 2; docs/few-shot.md gives the rule)."""
    await require_category(backend, name)
    parts = await _read_parts(request, ("good", "defective"), settings.max_image_pixels)
    good, bad = parts["good"], parts["defective"]
    refs = await load_refs(backend, name)
    if not good and not bad:
        if len(refs) < 2:
            raise ServiceError(422, "not_enough_references",
                               f"calibrating from references needs at least 2; category {name!r} holds {len(refs)}. "
                               "Send labelled images (parts 'good' and 'defective') instead, add references, or judge recorded "
                               f"inspections (POST /v1/inspections/{{id}}/review) and POST /v1/categories/{name}/learn")
        before = await current_threshold(backend, settings, name)
        old = await load_threshold(backend, name)
        record = ThresholdRecord("references", None, refs.digest, review_margin=old.review_margin if old else 0.0)
        await store_extra(backend, name, THRESHOLD_KIND, record.to_json())
        await refresh_reference_threshold(backend, settings, name, refs)
        await note_threshold_change(backend, settings, name, before, who.name, "calibrated",
                                    {"rule": "references", "references": len(refs)})
        stored = await load_threshold(backend, name)
        assert stored is not None
        return {"category": name, "threshold": stored.threshold, "threshold_source": "references",
                "n_good": len(refs), "n_defective": 0, "references": len(refs)}
    if not good or not bad:
        raise ServiceError(422, "validation_error", "labelled calibration needs at least one 'good' and one "
                           f"'defective' image (got {len(good)} and {len(bad)})")
    gathered = LabelledScores()
    for defective, items in ((False, good), (True, bad)):
        for data, image in items:
            outcome = await score_image(backend, settings, name, data, image)
            gathered.add(outcome.result.score, defective, outcome.model.get("version"))
    cal = gathered.threshold()  # the one labelled rule (service/catalog/thresholds.py); 409 on a model change
    record = cal.record(refs.digest if len(refs) else "", gathered.model_version())
    await store_threshold(backend, settings, name, record, who.name, "calibrated",
                          {"rule": "labelled", "n_good": cal.n_good, "n_defective": cal.n_defective, "f1": cal.f1})
    return {"category": name, "threshold": cal.threshold, "threshold_source": "labelled", "n_good": cal.n_good,
            "n_defective": cal.n_defective, "f1": cal.f1, "references": len(refs), "scores": cal.scores()}
