"""A category's normal references and its calibration from images, as the references routes and `learn` use
them. References are stored beside the category in the durable catalog; each process builds its own patch
memory from them with its model (service/engine/references.py). A threshold that depends on them follows:
the references rule is measured again by the engine, and a labelled threshold lapses (service/catalog/
thresholds.py says when); the change of the rule is kept in the threshold's history.
"""

from __future__ import annotations

from typing import Any

from service.backends.base import Backend
from service.catalog.references import REFERENCES_KIND, ReferenceImage, ReferenceSet
from service.catalog.thresholds import LabelledScores, ThresholdRecord
from service.core.errors import ServiceError
from service.settings import FiloSettings
from service.workflows.category_state import load_refs, load_threshold, require_category, score_image, store_extra
from service.workflows.thresholds import threshold_change, write_threshold

Decoded = tuple[bytes, Any]  # an upload as sent, and its decoded HxWx3 uint8 pixels


async def listing(backend: Backend, name: str, refs: ReferenceSet | None = None) -> dict[str, Any]:
    """What the references routes answer: the category's references and their memory on the device."""
    if refs is None:
        await require_category(backend, name)
        refs = await load_refs(backend, name)
    return {"category": name, "references": len(refs), "items": [im.item() for im in refs.images],
            "memory_bytes": await backend.reference_memory_bytes(name) if len(refs) else 0}


async def replace_refs(backend: Backend, name: str, refs: ReferenceSet, actor: str,
                       detail: dict[str, Any] | None = None) -> dict[str, int | None]:
    """Store a category's new reference set; the change of its threshold it causes is kept (with `detail`)."""
    async with threshold_change(backend, name, actor, "references",
                                {"references": len(refs), **(detail or {})}) as change:
        change.applied = await store_extra(backend, name, REFERENCES_KIND, refs.to_json())
    return change.applied


async def add(backend: Backend, settings: FiloSettings, name: str, images: list[Decoded], actor: str
              ) -> dict[str, Any]:
    """Add normal images (duplicates by content count once), up to `reference_max_images`."""
    await require_category(backend, name)
    if not images:
        raise ServiceError(422, "validation_error", "send one or more file parts named 'images'")
    refs = await load_refs(backend, name)
    new = refs.added(ReferenceImage.from_bytes(data, img.shape[1], img.shape[0]) for data, img in images)
    if len(new) > settings.reference_max_images:
        raise ServiceError(413, "too_many_references",
                           f"category {name!r} would hold {len(new)} references; the maximum is "
                           f"{settings.reference_max_images} (FILO_REFERENCE_MAX_IMAGES); nothing was stored")
    applied = await replace_refs(backend, name, new, actor)
    return {**await listing(backend, name, new), **applied}


async def remove_all(backend: Backend, name: str, actor: str) -> dict[str, Any]:
    """The category is zero-shot again (exactly)."""
    await require_category(backend, name)
    await replace_refs(backend, name, ReferenceSet(), actor)
    return await listing(backend, name, ReferenceSet())


async def remove(backend: Backend, name: str, ref_id: str, actor: str) -> dict[str, Any]:
    await require_category(backend, name)
    refs = await load_refs(backend, name)
    if ref_id not in refs.ids():
        raise ServiceError(404, "unknown_reference", f"category {name!r} has no reference {ref_id!r}",
                           details={"known": refs.ids()})
    left = refs.without(ref_id)
    await replace_refs(backend, name, left, actor)
    return await listing(backend, name, left)


async def calibrate(backend: Backend, settings: FiloSettings, name: str, good: list[Decoded], defective: list[Decoded],
                    actor: str) -> dict[str, Any]:
    """The category's threshold from labelled images (F1-max, the one labelled rule of service/catalog/
    thresholds.py, scored through the ordinary inspection path with the current references), or, with no
    images, the references rule (needs at least 2 references)."""
    await require_category(backend, name)
    refs = await load_refs(backend, name)
    if not good and not defective:
        return await _calibrate_from_references(backend, name, refs, actor)
    if not good or not defective:
        raise ServiceError(422, "validation_error", "labelled calibration needs at least one 'good' and one "
                           f"'defective' image (got {len(good)} and {len(defective)})")
    gathered = LabelledScores()
    for is_defective, items in ((False, good), (True, defective)):
        for data, image in items:
            outcome = await score_image(backend, settings, name, data, image)
            gathered.add(outcome.result.score, is_defective, outcome.model.get("version"))
    cal = gathered.threshold()  # 409 model_changed where two models scored the images
    record = cal.record(refs.digest if len(refs) else "", gathered.model_version())
    async with threshold_change(backend, name, actor, "calibrated",
                                {"rule": "labelled", "n_good": cal.n_good, "n_defective": cal.n_defective,
                                 "f1": cal.f1}) as change:
        change.applied = await write_threshold(backend, name, record)
    return {"category": name, "threshold": cal.threshold, "threshold_source": "labelled", "n_good": cal.n_good,
            "n_defective": cal.n_defective, "f1": cal.f1, "references": len(refs), "scores": cal.scores()}


async def _calibrate_from_references(backend: Backend, name: str, refs: ReferenceSet, actor: str) -> dict[str, Any]:
    if len(refs) < 2:
        raise ServiceError(422, "not_enough_references",
                           f"calibrating from references needs at least 2; category {name!r} holds {len(refs)}. "
                           "Send labelled images (parts 'good' and 'defective') instead, add references, or judge "
                           f"recorded inspections (POST /v1/inspections/{{id}}/review) and POST /v1/categories/{name}"
                           "/learn")
    async with threshold_change(backend, name, actor, "calibrated",
                                {"rule": "references", "references": len(refs)}) as change:
        old = await load_threshold(backend, name)
        record = ThresholdRecord("references", None, refs.digest, review_margin=old.review_margin if old else 0.0)
        change.applied = await write_threshold(backend, name, record, keep_margin=False)
    rule = await backend.threshold_rule(name)
    return {"category": name, "threshold": rule.threshold, "threshold_source": rule.source,
            "n_good": len(refs), "n_defective": 0, "references": len(refs)}
