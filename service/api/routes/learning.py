"""The review loop's writes to a category: a threshold set by hand (with its review band), the history of
every threshold change, and `learn`, which turns people's judgements into references and a threshold.

`learn` is the labelled rule that exists (F1-max, service/catalog/thresholds.py) fed with reviewed
records instead of uploaded files: reviewed false alarms whose images were kept become normal
references (within the reference limit); then the kept images of every reviewed record are scored
again through the ordinary inspection path (the references just changed the score scale) and the cut
is set on those scores. Defect types reviewers typed that the category lacks come back as suggestions;
they are not added silently.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from service.api.auth import Admin, Reader
from service.api.category_extras import (
    current_threshold,
    load_refs,
    load_threshold,
    refresh_reference_threshold,
    replace_refs,
    require_category,
    score_image,
    store_threshold,
)
from service.api.deps import BackendDep, SettingsDep
from service.api.params import NameParam
from service.api.schemas import ERROR_RESPONSES
from service.backends.base import Backend
from service.catalog.references import ReferenceImage, ReferenceSet
from service.catalog.thresholds import LabelledScores, NotEnoughLabelled, ThresholdRecord
from service.core.errors import ServiceError
from service.core.imaging import ImageDecodeError, decode_image
from service.records.model import InspectionRecord
from service.records.recorder import Records
from service.settings import FiloSettings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/categories", tags=["review loop"])


class ThresholdIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, ge=0, le=1, description="the cut by hand; null removes a manual one")
    review_margin: float | None = Field(None, ge=0, le=1, description="results within this of the threshold "
                                        "are answered needs_review and wait in the review queue; 0 turns it off")


def _records(backend: Backend) -> Records:
    if backend.records is None:
        raise ServiceError(404, "records_disabled", "inspection records are off on this server (FILO_RECORDS=false)")
    return backend.records


@router.put("/{name}/threshold", responses=ERROR_RESPONSES, summary="Set the threshold and review band by hand")
async def put_threshold(name: NameParam, body: ThresholdIn, request: Request, backend: BackendDep,
                        settings: SettingsDep, who: Admin) -> dict[str, Any]:
    await require_category(backend, name)
    old = await load_threshold(backend, name)
    margin = body.review_margin if body.review_margin is not None else (old.review_margin if old else 0.0)
    if "threshold" not in body.model_fields_set:  # the band alone
        record = ThresholdRecord(**{**(old.__dict__ if old else {"source": "references"}), "review_margin": margin})
        change = "review_margin"
    elif body.threshold is not None:
        record, change = ThresholdRecord("manual", body.threshold, review_margin=margin), "manual"
    else:  # back to what the references say (the default with fewer than 2)
        refs = await load_refs(backend, name)
        record, change = ThresholdRecord("references", None, refs.digest, review_margin=margin), "removed"
    await store_threshold(backend, settings, name, record, who.name, change,
                          {"review_margin": margin, "requested": body.model_dump(exclude_unset=True)},
                          keep_margin=False)
    if record.source == "references":
        await refresh_reference_threshold(backend, settings, name, await load_refs(backend, name))
    _forget_margin(request, name)
    return await thresholds(name, backend, settings, who)


def _forget_margin(request: Request, name: str) -> None:
    request.app.state.review_margins.forget(name)


@router.get("/{name}/thresholds", responses=ERROR_RESPONSES, summary="The threshold now and every change to it")
async def thresholds(name: NameParam, backend: BackendDep, settings: SettingsDep, _: Reader) -> dict[str, Any]:
    await require_category(backend, name)
    value, source = await current_threshold(backend, settings, name)
    record = await load_threshold(backend, name)
    history = await backend.records.threshold_history(name) if backend.records is not None else []
    return {"category": name,
            "current": {"threshold": value, "source": source,
                        "review_margin": record.review_margin if record else 0.0},
            "history": [h.out() for h in history]}


# --- learn ----------------------------------------------------------------------------------------------


async def _kept_image(records: Records, record: InspectionRecord, max_pixels: int) -> tuple[bytes, Any] | None:
    art = await records.artefact(record.id, "image")
    if art is None:
        return None
    try:
        return art.data, await anyio.to_thread.run_sync(decode_image, art.data, max_pixels)
    except ImageDecodeError:
        return None


def _suggestions(reviewed: list[InspectionRecord], known: tuple[str, ...]) -> list[str]:
    have = {d.strip().lower() for d in known}
    out: dict[str, str] = {}
    for r in reviewed:
        typed = (r.review.defect_type or "").strip() if r.review and r.review.label == "defect" else ""
        if typed and typed.lower() not in have:
            out.setdefault(typed.lower(), typed)
    return list(out.values())


async def _new_references(records: Records, reviewed: list[InspectionRecord], refs: ReferenceSet,
                          settings: FiloSettings, notes: list[str]) -> ReferenceSet:
    """Reviewed false alarms (NG judged good) with their image kept, added up to the reference limit."""
    out = refs
    for r in reviewed:
        if not (r.is_anomalous and r.review and r.review.label == "good"):
            continue
        if len(out) >= settings.reference_max_images:
            notes.append(f"reference limit {settings.reference_max_images} reached: further false alarms not added")
            break
        kept = await _kept_image(records, r, settings.max_image_pixels)
        if kept is None:
            notes.append(f"false alarm {r.id}: image not kept, cannot become a reference")
            continue
        data, image = kept
        out = out.added([ReferenceImage.from_bytes(data, image.shape[1], image.shape[0])])
    return out


async def _rescored(backend: Backend, settings: FiloSettings, name: str, reviewed: list[InspectionRecord],
                    dry_run: bool) -> tuple[LabelledScores, str]:
    """The judged scores: the kept images scored now (the references may just have changed the scale), or in a
    dry run, which scores nothing, the recorded ones."""
    gathered = LabelledScores()
    if dry_run:
        for r in reviewed:
            if r.review is not None:
                gathered.add(r.score, r.review.label == "defect", r.model_version)
        return gathered, "recorded scores (a dry run scores nothing)"
    records = _records(backend)
    for r in reviewed:
        kept = await _kept_image(records, r, settings.max_image_pixels)
        if kept is None or r.review is None:
            continue
        outcome = await score_image(backend, settings, name, kept[0], kept[1])
        gathered.add(outcome.result.score, r.review.label == "defect", str(outcome.model.get("version")))
    return gathered, "kept images scored again with the current references"


async def _learn_threshold(backend: Backend, settings: FiloSettings, name: str, reviewed: list[InspectionRecord],
                           refs: ReferenceSet, actor: str, dry_run: bool, notes: list[str]) -> dict[str, Any] | None:
    """The labelled rule on the judged scores (service/catalog/thresholds.py), stored as `learned`."""
    before, _ = await current_threshold(backend, settings, name)
    gathered, how = await _rescored(backend, settings, name, reviewed, dry_run)
    try:
        cal = gathered.threshold()
    except NotEnoughLabelled:
        notes.append("the threshold needs reviewed results of both kinds (with images kept): left as it is")
        return None
    except ServiceError:  # model_changed: the scores are not one scale
        notes.append(f"reviewed results come from several models {sorted(gathered.model_versions, key=str)}: "
                     "threshold left as it is")
        return None
    if not dry_run:
        record = replace(cal.record(refs.digest if len(refs) else "", gathered.model_version()), source="learned")
        await store_threshold(backend, settings, name, record, actor, "learned",
                              {"n_good": cal.n_good, "n_defective": cal.n_defective, "f1": cal.f1})
    return {"before": before, "after": cal.threshold, "source": "learned", "f1": cal.f1, "how": how,
            "n_good": cal.n_good, "n_defective": cal.n_defective}


@router.post("/{name}/learn", responses=ERROR_RESPONSES,
             summary="Turn reviewed records into references, a threshold and suggested descriptions (admin)")
async def learn(name: NameParam, request: Request, backend: BackendDep, settings: SettingsDep, who: Admin,
                dry_run: Annotated[bool, Query(description="show the plan, change nothing")] = False
                ) -> dict[str, Any]:
    await require_category(backend, name)
    records = _records(backend)
    reviewed = await records.reviewed(name)
    category = next(c for c in await backend.list_categories() if c.name == name)
    notes: list[str] = []
    refs = await load_refs(backend, name)
    new_refs = await _new_references(records, reviewed, refs, settings, notes)
    added = len(new_refs) - len(refs)
    if added and not dry_run:
        await replace_refs(backend, settings, name, new_refs, who.name, {"by": "learn"})
    threshold = await _learn_threshold(backend, settings, name, reviewed, new_refs, who.name, dry_run, notes)
    _forget_margin(request, name)
    return {"category": name, "dry_run": dry_run, "reviewed": len(reviewed), "references_added": added,
            "references": len(new_refs), "threshold": threshold,
            "suggested_descriptions": _suggestions(reviewed, category.descriptions), "notes": notes}
