"""A category's stored extras (its normal references and threshold record) as the workflows read and write
them, through the backend interface, in both modes."""

from __future__ import annotations

import time
import uuid
from typing import Any

from service.backends.base import Backend, InspectJob, InspectOutcome
from service.catalog.references import REFERENCES_KIND, THRESHOLD_KIND, ReferenceSet
from service.catalog.thresholds import ThresholdRecord
from service.core.errors import CategoryNotFoundError
from service.core.imaging import HeatmapSpec
from service.settings import FiloSettings


async def require_category(backend: Backend, name: str) -> None:
    """404 `unknown_category` (with the names there are) before anything is read or written."""
    names = [c.name for c in await backend.list_categories()]
    if name not in names:
        raise CategoryNotFoundError(name, names)


async def load_refs(backend: Backend, name: str) -> ReferenceSet:
    raw = await backend.get_extra(name, REFERENCES_KIND)
    return ReferenceSet.from_json(raw) if raw else ReferenceSet()


async def load_threshold(backend: Backend, name: str) -> ThresholdRecord | None:
    raw = await backend.get_extra(name, THRESHOLD_KIND)
    return ThresholdRecord.from_json(raw) if raw else None


async def store_extra(backend: Backend, name: str, kind: str, data: bytes) -> dict[str, int | None]:
    """Store one extra and make it effective before answering: embedded mode applies it to the engine now
    (between batches); queue mode waits (up to `category_apply_timeout_s`) until every live worker has applied
    the new catalog version, so the next inspection already sees it. Queue mode says how many had."""
    applied = await backend.put_extra(name, kind, data)
    if applied.workers_live is None:
        return {}
    return {"workers_ready": applied.workers_ready, "workers_live": applied.workers_live}


async def score_image(backend: Backend, settings: FiloSettings, name: str, data: bytes, image: Any) -> InspectOutcome:
    """One image through the ordinary inspection path, with no heatmap and reaching no sink: how calibration
    and learning score images with the category's current references."""
    job = InspectJob(request_id=uuid.uuid4().hex, category=name,
                     image=image if backend.decodes_in_process else None, image_bytes=data, top_k=1,
                     grounding=None, heatmap=HeatmapSpec("none"), deadline=time.monotonic() + settings.request_timeout_s)
    return await backend.inspect(job)
