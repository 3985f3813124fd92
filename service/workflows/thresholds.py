"""A category's threshold: the rule it applies now, every change to it as one step, and its history.

The rule itself is resolved by the engine (service/catalog/thresholds.py `resolve`) and read through the
backend (`Backend.threshold_rule`), so `GET /v1/categories/{name}`, `GET .../thresholds` and the next
inspection agree. Every write that can move it (a threshold by hand, calibration, learning, new or removed
references) runs inside `threshold_change`: under the category's lock, the rule before, the write, the rule
after once it is in force, and one history entry when the value or its source moved, so the history's
`previous` is always the last entry's value.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from service.backends.base import Backend
from service.catalog.references import THRESHOLD_KIND
from service.catalog.thresholds import ThresholdRecord, ThresholdRule
from service.records.model import ThresholdChange
from service.workflows.category_state import load_refs, load_threshold, require_category, store_extra


@dataclass
class Change:
    """What a write inside `threshold_change` says of itself for the history (it may refine both)."""

    kind: str  # manual | calibrated | learned | references | removed | review_margin
    detail: dict[str, Any] = field(default_factory=dict)
    applied: dict[str, int | None] = field(default_factory=dict)  # queue mode: workers ready / live


@asynccontextmanager
async def threshold_change(backend: Backend, name: str, actor: str, kind: str,
                           detail: dict[str, Any] | None = None) -> AsyncIterator[Change]:
    async with backend.category_lock(name):
        before = await backend.threshold_rule(name)
        change = Change(kind, dict(detail or {}))
        yield change
        after = await backend.threshold_rule(name)
        await _note(backend, name, before, after, actor, change)


async def _note(backend: Backend, name: str, before: ThresholdRule, after: ThresholdRule, actor: str,
                change: Change) -> None:
    """Keep a change of the category's threshold in its history (who, when, from what, the value before);
    nothing when the value and its source stayed as they were."""
    if (after.threshold, after.source) == (before.threshold, before.source) or backend.records is None:
        return
    kind = change.kind
    if after.source == "default" and before.source != "default":
        kind = "removed"  # e.g. a labelled threshold that no longer holds once its references changed
    await backend.records.add_threshold_change(ThresholdChange(name, kind, after.threshold, before.threshold, actor,
                                                               {"source": after.source, **change.detail}))


async def write_threshold(backend: Backend, name: str, record: ThresholdRecord, keep_margin: bool = True
                          ) -> dict[str, int | None]:
    """Store a category's threshold record (inside `threshold_change`). The review band outlives a
    recalibration (`keep_margin`)."""
    old = await load_threshold(backend, name)
    if keep_margin and old is not None and old.review_margin and not record.review_margin:
        record = replace(record, review_margin=old.review_margin)
    return await store_extra(backend, name, THRESHOLD_KIND, record.to_json())


async def set_by_hand(backend: Backend, name: str, fields: dict[str, Any], actor: str) -> None:
    """`PUT .../threshold`: `fields` holds what the admin sent, `threshold` (a value, or None to go back to what
    the references say) and/or `review_margin`; the band alone leaves the threshold as it is."""
    await require_category(backend, name)
    async with threshold_change(backend, name, actor, "manual", {"requested": dict(fields)}) as change:
        old = await load_threshold(backend, name)
        margin = fields.get("review_margin")
        margin = float(margin) if margin is not None else (old.review_margin if old else 0.0)
        if "threshold" not in fields:
            record = replace(old, review_margin=margin) if old else ThresholdRecord("references", review_margin=margin)
            change.kind = "review_margin"
        elif fields["threshold"] is not None:
            record = ThresholdRecord("manual", float(fields["threshold"]), review_margin=margin)
        else:
            refs = await load_refs(backend, name)
            record, change.kind = ThresholdRecord("references", None, refs.digest, review_margin=margin), "removed"
        change.detail["review_margin"] = margin
        change.applied = await write_threshold(backend, name, record, keep_margin=False)


async def overview(backend: Backend, name: str) -> dict[str, Any]:
    """`GET .../thresholds`: the rule in force and every change, oldest first."""
    await require_category(backend, name)
    rule = await backend.threshold_rule(name)
    history = await backend.records.threshold_history(name) if backend.records is not None else []
    return {"category": name,
            "current": {"threshold": rule.threshold, "source": rule.source, "review_margin": rule.review_margin},
            "history": [h.out() for h in history]}
