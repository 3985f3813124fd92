"""A category's stored extras (references, threshold) as the routes read and write them, through the backend
interface: one home for what the references, calibration and learn routes share."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from service.backends.base import Backend, InspectJob
from service.catalog.references import REFERENCES_KIND, THRESHOLD_KIND, ReferenceSet
from service.catalog.thresholds import ThresholdRecord
from service.core.errors import CategoryNotFoundError, ServiceError
from service.core.imaging import HeatmapSpec, decode_image
from service.records.model import ThresholdChange

log = logging.getLogger(__name__)


async def load_refs(backend: Backend, name: str) -> ReferenceSet:
    raw = await backend.get_extra(name, REFERENCES_KIND)
    return ReferenceSet.from_json(raw) if raw else ReferenceSet()


async def load_threshold(backend: Backend, name: str) -> ThresholdRecord | None:
    raw = await backend.get_extra(name, THRESHOLD_KIND)
    return ThresholdRecord.from_json(raw) if raw else None


async def category_threshold(backend: Backend, settings: Any, name: str) -> dict[str, Any]:
    """GET /v1/categories/{name}'s extra fields: threshold, threshold_source, references."""
    refs = await load_refs(backend, name)
    record = await load_threshold(backend, name)
    default = settings.thresholds.get(name, settings.default_threshold)
    digest = refs.digest if len(refs) else ""
    if record is not None and record.source == "manual" and record.threshold is not None:
        return {"threshold": record.threshold, "threshold_source": "manual", "references": len(refs)}
    if record is not None and record.threshold is not None and record.references_digest == digest:
        return {"threshold": record.threshold, "threshold_source": record.source, "references": len(refs)}
    return {"threshold": default, "threshold_source": "default", "references": len(refs)}


async def current_threshold(backend: Backend, settings: Any, name: str) -> tuple[float, str]:
    """(value, source) the category's GET shows now."""
    now = await category_threshold(backend, settings, name)
    return float(now["threshold"]), str(now["threshold_source"])


async def note_threshold_change(backend: Backend, settings: Any, name: str, before: tuple[float, str], actor: str,
                                change: str, detail: dict[str, Any]) -> None:
    """Keep a change of the category's threshold in its history (who, when, from what, the value before);
    nothing when the value and its source stayed as they were."""
    after = await current_threshold(backend, settings, name)
    if after == before or backend.records is None:
        return
    if after[1] == "default" and before[1] != "default":
        change = "removed"  # e.g. a labelled threshold that no longer holds once its references changed
    await backend.records.add_threshold_change(ThresholdChange(name, change, after[0], before[0], actor,
                                                               {"source": after[1], **detail}))


async def store_threshold(backend: Backend, settings: Any, name: str, record: ThresholdRecord, actor: str,
                          change: str, detail: dict[str, Any], keep_margin: bool = True) -> None:
    """Store a category's threshold record and keep the change in its history. Every threshold write goes
    through here: by hand, calibrated, learned. The review band outlives a recalibration (`keep_margin`)."""
    before = await current_threshold(backend, settings, name)
    old = await load_threshold(backend, name)
    if keep_margin and old is not None and old.review_margin and not record.review_margin:
        record = ThresholdRecord(**{**record.__dict__, "review_margin": old.review_margin})
    await backend.put_extra(name, THRESHOLD_KIND, record.to_json())
    await note_threshold_change(backend, settings, name, before, actor, change, detail)


class ReviewMargins:
    """Each category's review margin as the inspect route needs it: read from the catalog at most every
    `ttl_s` per category (a change made through this process is seen at once, others' within `ttl_s`)."""

    def __init__(self, ttl_s: float = 2.0) -> None:
        self.ttl_s = ttl_s
        self._seen: dict[str, tuple[float, float]] = {}

    async def get(self, backend: Backend, name: str) -> float:
        hit = self._seen.get(name)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        record = await load_threshold(backend, name)
        margin = record.review_margin if record is not None else 0.0
        self._seen[name] = (time.monotonic(), margin)
        return margin

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)


# --- writes: the same calls in both modes -----------------------------------------------------------------


async def store_extra(backend: Backend, name: str, kind: str, data: bytes) -> dict[str, int | None]:
    """Store one extra and make it effective before answering: embedded mode applies it to the engine
    now (between batches); queue mode waits (up to `category_apply_timeout_s`) until every live worker
    has applied the new catalog version, so the next inspection already sees it."""
    applied = await backend.put_extra(name, kind, data)
    if applied.workers_live is None:
        return {}
    return {"workers_ready": applied.workers_ready, "workers_live": applied.workers_live}


async def require_category(backend: Backend, name: str) -> None:
    """404 `unknown_category` (with the names there are) before anything is read or written."""
    names = [c.name for c in await backend.list_categories()]
    if name not in names:
        raise CategoryNotFoundError(name, names)


async def replace_refs(backend: Backend, settings: Any, name: str, refs: ReferenceSet, actor: str,
                       detail: dict[str, Any] | None = None) -> dict[str, int | None]:
    """Store a category's new reference set; its threshold follows (the references rule is measured again, a
    labelled threshold lapses), and a change of the threshold is kept in its history (with `detail`)."""
    before = await current_threshold(backend, settings, name)
    applied = await store_extra(backend, name, REFERENCES_KIND, refs.to_json())
    await refresh_reference_threshold(backend, settings, name, refs)
    await note_threshold_change(backend, settings, name, before, actor, "references",
                                {"references": len(refs), **(detail or {})})
    return applied


async def score_image(backend: Backend, settings: Any, name: str, data: bytes, image: Any) -> Any:
    """One image through the ordinary inspection path (no heatmap): its InspectOutcome."""
    job = InspectJob(request_id=uuid.uuid4().hex, category=name,
                     image=image if backend.decodes_in_process else None, image_bytes=data, top_k=1,
                     grounding=None, heatmap=HeatmapSpec("none"), deadline=time.monotonic() + settings.request_timeout_s)
    return await backend.inspect(job)


async def refresh_reference_threshold(backend: Backend, settings: Any, name: str, refs: ReferenceSet) -> None:
    """A references-rule threshold follows its references: re-read its value (what GET shows)."""
    record = await load_threshold(backend, name)
    if record is None or record.source != "references":
        return
    value = None
    if len(refs) >= 2:
        try:
            image = decode_image(refs.images[0].data, settings.max_image_pixels)
            result = (await score_image(backend, settings, name, refs.images[0].data, image)).result
        except ServiceError as exc:  # e.g. no live worker: inspections still resolve it themselves
            log.warning("category %s: could not read its references threshold back (%s)", name, exc.message)
            return
        value = result.threshold if result.threshold_source == "references" else None
    updated = ThresholdRecord("references", value, refs.digest, review_margin=record.review_margin)
    await store_extra(backend, name, THRESHOLD_KIND, updated.to_json())
