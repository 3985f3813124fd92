"""`learn`: people's judgements of recorded results turned into references and a threshold.

The labelled rule that exists (F1-max, service/catalog/thresholds.py) fed with reviewed records instead of
uploaded files: reviewed false alarms whose images were kept become normal references (within the reference
limit); then the kept images of every reviewed record are scored again through the ordinary inspection path
(the references just changed the score scale) and the cut is set on those scores. Defect types reviewers typed
that the category lacks come back as suggestions; they are not added silently. `POST
/v1/categories/{name}/learn` (admin) runs it as a background job of the category (`start_learning`; a dry run
scores nothing and answers at once), and `filo learn` runs this same function in the foreground.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import anyio

from service.backends.base import Backend
from service.backends.jobs import Job
from service.catalog.references import ReferenceImage, ReferenceSet
from service.catalog.thresholds import LabelledScores, NotEnoughLabelled
from service.core.errors import ServiceError
from service.core.imaging import ImageDecodeError, decode_image
from service.records.model import InspectionRecord
from service.records.recorder import Records
from service.settings import FiloSettings
from service.workflows import jobs
from service.workflows.category_state import load_refs, require_category, score_image
from service.workflows.jobs import Progress
from service.workflows.records import records_of
from service.workflows.references import replace_refs
from service.workflows.thresholds import threshold_change, write_threshold

RESCORE_CONCURRENCY = 2  # kept images in flight at once: a learn adds at most 2 images to any batch the line shares


async def start_learning(backend: Backend, settings: FiloSettings, name: str, actor: str) -> Job:
    """`learn` as a background job of the category (one at a time; 409 `job_running` while one runs)."""
    await require_category(backend, name)
    records_of(backend)  # 404 records_disabled now, not later in the job
    return await jobs.start(backend, "learn", name, actor,
                            lambda progress: learn(backend, settings, name, actor, progress=progress))


async def learn(backend: Backend, settings: FiloSettings, name: str, actor: str, dry_run: bool = False,
                progress: Progress | None = None) -> dict[str, Any]:
    """Learn from the category's reviewed records; `dry_run` shows the plan and changes nothing."""
    await require_category(backend, name)
    records = records_of(backend)
    reviewed = await records.reviewed(name)
    category = next(c for c in await backend.list_categories() if c.name == name)
    notes: list[str] = []
    refs = await load_refs(backend, name)
    new_refs = await _new_references(records, reviewed, refs, settings, notes)
    added = len(new_refs) - len(refs)
    if added and not dry_run:
        if progress is not None:
            await progress.stage(f"adding {added} reference(s) and building their memory")
        await replace_refs(backend, name, new_refs, actor, {"by": "learn"})
    threshold = await _learn_threshold(backend, settings, name, reviewed, new_refs, actor, dry_run, notes, progress)
    return {"category": name, "dry_run": dry_run, "reviewed": len(reviewed), "references_added": added,
            "references": len(new_refs), "threshold": threshold,
            "suggested_descriptions": _suggestions(reviewed, category.descriptions), "notes": notes}


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
                    dry_run: bool, progress: Progress | None) -> tuple[LabelledScores, str]:
    """The judged scores: the kept images scored now (the references may just have changed the scale), a few at
    once so the engine batches them, or in a dry run, which scores nothing, the recorded ones."""
    gathered = LabelledScores()
    judged = [r for r in reviewed if r.review is not None]
    if dry_run:
        for r in judged:
            gathered.add(r.score, r.review.label == "defect", r.model_version)  # type: ignore[union-attr]
        return gathered, "recorded scores (a dry run scores nothing)"
    records = records_of(backend)
    if progress is not None:
        await progress.stage("scoring the reviewed images again", len(judged))
    gate = asyncio.Semaphore(RESCORE_CONCURRENCY)

    async def score(r: InspectionRecord) -> tuple[float, str] | None:
        async with gate:
            kept = await _kept_image(records, r, settings.max_image_pixels)
            outcome = None if kept is None else await score_image(backend, settings, name, kept[0], kept[1])
            if progress is not None:
                await progress.step()
        return None if outcome is None else (outcome.result.score, str(outcome.model.get("version")))

    for r, scored in zip(judged, await asyncio.gather(*(score(r) for r in judged)), strict=True):
        if scored is not None:  # in review order, whatever order they were scored in
            gathered.add(scored[0], r.review.label == "defect", scored[1])  # type: ignore[union-attr]
    return gathered, "kept images scored again with the current references"


async def _learn_threshold(backend: Backend, settings: FiloSettings, name: str, reviewed: list[InspectionRecord],
                           refs: ReferenceSet, actor: str, dry_run: bool, notes: list[str],
                           progress: Progress | None = None) -> dict[str, Any] | None:
    """The labelled rule on the judged scores, stored as `learned`."""
    before = (await backend.threshold_rule(name)).threshold
    gathered, how = await _rescored(backend, settings, name, reviewed, dry_run, progress)
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
        async with threshold_change(backend, name, actor, "learned",
                                    {"n_good": cal.n_good, "n_defective": cal.n_defective, "f1": cal.f1}) as change:
            change.applied = await write_threshold(backend, name, record)
    return {"before": before, "after": cal.threshold, "source": "learned", "f1": cal.f1, "how": how,
            "n_good": cal.n_good, "n_defective": cal.n_defective}
