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
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from service.api.auth import Admin, Reader
from service.api.category_extras import category_threshold, load_refs, load_threshold
from service.api.deps import BackendDep, SettingsDep
from service.api.params import NameParam
from service.api.routes.references import _refresh_reference_threshold, _require_category, _score, _store_refs
from service.api.schemas import ERROR_RESPONSES
from service.backends.base import Backend
from service.catalog.references import THRESHOLD_KIND, ReferenceImage, ReferenceSet
from service.catalog.thresholds import ThresholdRecord, f1_max_threshold
from service.core.errors import ServiceError
from service.core.imaging import ImageDecodeError, decode_image
from service.records.model import InspectionRecord, ThresholdChange
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


async def _current(backend: Backend, settings: FiloSettings, name: str) -> tuple[float, str]:
    now = await category_threshold(backend, settings, name)
    return float(now["threshold"]), str(now["threshold_source"])


async def store_threshold(backend: Backend, settings: FiloSettings, name: str, record: ThresholdRecord,
                          actor: str, change: str, detail: dict[str, Any]) -> None:
    """Store a category's threshold record and keep the change in its history (who, when, from what,
    the value before). Every threshold write of the review loop goes through here."""
    before, _ = await _current(backend, settings, name)
    await backend.put_extra(name, THRESHOLD_KIND, record.to_json())
    after, _ = await _current(backend, settings, name)
    if backend.records is not None:
        await backend.records.add_threshold_change(ThresholdChange(name, change, after, before, actor, detail))


@router.put("/{name}/threshold", responses=ERROR_RESPONSES, summary="Set the threshold and review band by hand")
async def put_threshold(name: NameParam, body: ThresholdIn, request: Request, backend: BackendDep,
                        settings: SettingsDep, who: Admin) -> dict[str, Any]:
    await _require_category(backend, name)
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
                          {"review_margin": margin, "requested": body.model_dump(exclude_unset=True)})
    if record.source == "references":
        await _refresh_reference_threshold(backend, settings, name, await load_refs(backend, name))
    _forget_margin(request, name)
    return await thresholds(name, backend, settings, who)


def _forget_margin(request: Request, name: str) -> None:
    request.app.state.review_margins.forget(name)


@router.get("/{name}/thresholds", responses=ERROR_RESPONSES, summary="The threshold now and every change to it")
async def thresholds(name: NameParam, backend: BackendDep, settings: SettingsDep, _: Reader) -> dict[str, Any]:
    await _require_category(backend, name)
    value, source = await _current(backend, settings, name)
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
                    dry_run: bool) -> tuple[list[float], list[int], set[str], str]:
    """(scores, labels, model versions, how): kept images scored now, or in a dry run the recorded scores."""
    records = _records(backend)
    if dry_run:
        return ([r.score for r in reviewed], [int(r.review.label == "defect") for r in reviewed if r.review],
                {r.model_version for r in reviewed}, "recorded scores (a dry run scores nothing)")
    scores, labels, versions = [], [], set()
    for r in reviewed:
        kept = await _kept_image(records, r, settings.max_image_pixels)
        if kept is None or r.review is None:
            continue
        outcome = await _score(backend, settings, name, kept[0], kept[1])
        scores.append(outcome.result.score)
        labels.append(int(r.review.label == "defect"))
        versions.add(str(outcome.model.get("version")))
    return scores, labels, versions, "kept images scored again with the current references"


@router.post("/{name}/learn", responses=ERROR_RESPONSES,
             summary="Turn reviewed records into references, a threshold and suggested descriptions (admin)")
async def learn(name: NameParam, request: Request, backend: BackendDep, settings: SettingsDep, who: Admin,
                dry_run: Annotated[bool, Query(description="show the plan, change nothing")] = False
                ) -> dict[str, Any]:
    await _require_category(backend, name)
    records = _records(backend)
    reviewed = await records.reviewed(name)
    category = next(c for c in await backend.list_categories() if c.name == name)
    notes: list[str] = []
    refs = await load_refs(backend, name)
    new_refs = await _new_references(records, reviewed, refs, settings, notes)
    added = len(new_refs) - len(refs)
    if added and not dry_run:
        await _store_refs(backend, name, new_refs)
        await _refresh_reference_threshold(backend, settings, name, new_refs)
    before, _ = await _current(backend, settings, name)
    scores, labels, versions, how = await _rescored(backend, settings, name, reviewed, dry_run)
    threshold_out = None
    if 1 in labels and 0 in labels and len(versions) == 1:
        value, f1 = f1_max_threshold(scores, labels)
        threshold_out = {"before": before, "after": value, "source": "learned", "f1": f1, "how": how,
                         "n_good": labels.count(0), "n_defective": labels.count(1)}
        if not dry_run:
            record = ThresholdRecord("learned", value, new_refs.digest if len(new_refs) else "", labels.count(0),
                                     labels.count(1), versions.pop(),
                                     review_margin=(await load_threshold(backend, name) or ThresholdRecord(
                                         "references")).review_margin)
            await store_threshold(backend, settings, name, record, who.name, "learned",
                                  {"n_good": labels.count(0), "n_defective": labels.count(1), "f1": f1})
    elif len(versions) > 1:
        notes.append(f"reviewed results come from several models {sorted(versions)}: threshold left as it is")
    else:
        notes.append("the threshold needs reviewed results of both kinds (with images kept): left as it is")
    _forget_margin(request, name)
    return {"category": name, "dry_run": dry_run, "reviewed": len(reviewed), "references_added": added,
            "references": len(new_refs), "threshold": threshold_out,
            "suggested_descriptions": _suggestions(reviewed, category.descriptions), "notes": notes}
