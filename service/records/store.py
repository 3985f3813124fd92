"""Reading and writing inspection records. Synchronous (SQLAlchemy Core); async callers use a thread.

Every write is idempotent on the record id, so the hand-off may deliver a record twice (a consumer that
died between the insert and its acknowledgement) and it is still kept once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, and_, case, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from service.records.model import (
    Artefact,
    Cursor,
    InspectionRecord,
    RecordQuery,
    Review,
    ThresholdChange,
    now_ms,
)
from service.records.schema import artefacts, inspections, reviews, threshold_changes

# "insert unless the key exists", per dialect: the statement differs, the meaning does not
_INSERT_IGNORE: dict[str, Callable[[Any], Any]] = {
    "postgresql": lambda table: postgresql.insert(table).on_conflict_do_nothing(),
    "sqlite": lambda table: sqlite.insert(table).on_conflict_do_nothing(),
}
BUCKET_MS = {"hour": 3_600_000, "day": 86_400_000}


def _row_to_record(row: Any) -> InspectionRecord:
    m = row._mapping
    review = None
    if m["review_label"] is not None:
        review = Review(m["review_label"], m["review_defect_type"], m["review_note"], m["reviewer"],
                        m["reviewed_ms"])
    return InspectionRecord(
        id=m["id"], created_ms=m["created_ms"], category=m["category"], score=m["score"],
        is_anomalous=bool(m["is_anomalous"]), needs_review=bool(m["needs_review"]), threshold=m["threshold"],
        threshold_source=m["threshold_source"], references=m["references"], position=m["position"],
        boxes=m["boxes"], top_types=m["top_types"], model_version=m["model_version"], timing_ms=m["timing_ms"],
        source=m["source"], part_id=m["part_id"], key_name=m["key_name"], has_image=bool(m["has_image"]), has_heatmap=bool(m["has_heatmap"]), review=review,
        heatmap_kind=m["heatmap_kind"],
    )


def _record_row(record: InspectionRecord) -> dict[str, Any]:
    kinds = {a.kind for a in record.artefacts}
    return {
        "id": record.id, "created_ms": record.created_ms, "category": record.category, "source": record.source,
        "part_id": record.part_id, "key_name": record.key_name,
        "score": record.score, "is_anomalous": record.is_anomalous, "needs_review": record.needs_review,
        "threshold": record.threshold, "threshold_source": record.threshold_source,
        "references": record.references, "position": record.position, "boxes": record.boxes,
        "top_types": record.top_types, "model_version": record.model_version, "timing_ms": record.timing_ms,
        "has_image": "image" in kinds, "has_heatmap": "heatmap" in kinds,
        # the kind only with the heatmap itself (a record may travel without its artefacts)
        "heatmap_kind": record.heatmap_kind if "heatmap" in kinds else None,
    }


def _where(query: RecordQuery) -> list[Any]:
    """The SQL conditions of the shared filters and of a limited key's reach."""
    t = inspections.c
    conds: list[Any] = []
    if query.category is not None:
        conds.append(t.category == query.category)
    if query.source is not None:
        conds.append(t.source == query.source)
    if query.part_id is not None:
        conds.append(t.part_id == query.part_id)
    if query.verdict is not None:
        conds.append(t.is_anomalous.is_(query.verdict == "ng"))
    if query.reviewed is not None:
        conds.append(t.review_label.is_not(None) if query.reviewed else t.review_label.is_(None))
    if query.needs_review is not None:
        conds.append(t.needs_review.is_(query.needs_review))
    if query.since_ms is not None:
        conds.append(t.created_ms >= query.since_ms)
    if query.until_ms is not None:
        conds.append(t.created_ms < query.until_ms)
    if query.allowed_categories is not None:
        conds.append(t.category.in_(query.allowed_categories))
    if query.allowed_sources is not None:  # a record without a source is outside every source limit
        conds.append(t.source.in_(query.allowed_sources))
    return conds


class RecordStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert_ignore = _INSERT_IGNORE[engine.dialect.name]

    # --- writing ------------------------------------------------------------------------------------
    def insert_many(self, records: list[InspectionRecord]) -> int:
        """Keep these records and their artefacts in one transaction; ids already kept are skipped.
        Returns how many were new."""
        if not records:
            return 0
        with self.engine.begin() as conn:
            ids = [r.id for r in records]
            known = set(conn.execute(select(inspections.c.id).where(inspections.c.id.in_(ids))).scalars())
            fresh = {r.id: r for r in records if r.id not in known}  # one per id, also within a batch
            if not fresh:
                return 0
            conn.execute(self._insert_ignore(inspections), [_record_row(r) for r in fresh.values()])
            arts = [{"inspection_id": r.id, "kind": a.kind, "media_type": a.media_type, "data": a.data}
                    for r in fresh.values() for a in r.artefacts]
            if arts:
                conn.execute(self._insert_ignore(artefacts), arts)
            return len(fresh)

    def review(self, record_id: str, review: Review) -> InspectionRecord | None:
        """Judge a record: the judgement replaces the current one; every judgement stays in the history."""
        with self.engine.begin() as conn:
            done = conn.execute(update(inspections).where(inspections.c.id == record_id).values(
                review_label=review.label, review_defect_type=review.defect_type, review_note=review.note,
                reviewer=review.reviewer, reviewed_ms=review.reviewed_ms))
            if done.rowcount == 0:
                return None
            conn.execute(insert(reviews).values(
                inspection_id=record_id, label=review.label, defect_type=review.defect_type, note=review.note,
                reviewer=review.reviewer, reviewed_ms=review.reviewed_ms))
        return self.get(record_id)

    def purge(self, retention_ms: int, now: int | None = None) -> int:
        """Delete records (with their artefacts and reviews) older than the retention; never a younger one."""
        cutoff = (now if now is not None else now_ms()) - retention_ms
        with self.engine.begin() as conn:
            old = select(inspections.c.id).where(inspections.c.created_ms < cutoff).scalar_subquery()
            conn.execute(delete(artefacts).where(artefacts.c.inspection_id.in_(old)))
            conn.execute(delete(reviews).where(reviews.c.inspection_id.in_(old)))
            return conn.execute(delete(inspections).where(inspections.c.created_ms < cutoff)).rowcount

    def add_threshold_change(self, change: ThresholdChange) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(threshold_changes).values(
                category=change.category, at_ms=change.at_ms, actor=change.actor, source=change.source,
                threshold=change.threshold, previous=change.previous, detail=change.detail))

    # --- reading ------------------------------------------------------------------------------------
    def get(self, record_id: str) -> InspectionRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(inspections).where(inspections.c.id == record_id)).first()
        return _row_to_record(row) if row is not None else None

    def artefact(self, record_id: str, kind: str) -> Artefact | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(artefacts.c.media_type, artefacts.c.data).where(
                artefacts.c.inspection_id == record_id, artefacts.c.kind == kind)).first()
        return Artefact(kind, row.media_type, bytes(row.data)) if row is not None else None  # type: ignore[arg-type]

    def list(self, query: RecordQuery, limit: int, cursor: Cursor | None = None
             ) -> tuple[list[InspectionRecord], Cursor | None]:
        """Newest first, `limit` at a time; the cursor continues strictly after the last record returned
        (keyset: stable while records arrive, no offset scans)."""
        t = inspections.c
        conds = _where(query)
        if cursor is not None:
            conds.append(or_(t.created_ms < cursor.created_ms,
                             and_(t.created_ms == cursor.created_ms, t.id < cursor.id)))
        stmt = select(inspections).where(*conds).order_by(t.created_ms.desc(), t.id.desc()).limit(limit + 1)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        items = [_row_to_record(r) for r in rows[:limit]]
        more = len(rows) > limit
        return items, (Cursor(items[-1].created_ms, items[-1].id) if more and items else None)

    def reviews(self, record_id: str) -> list[Review]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(reviews).where(reviews.c.inspection_id == record_id)
                                .order_by(reviews.c.id)).all()
        return [Review(r.label, r.defect_type, r.note, r.reviewer, r.reviewed_ms) for r in rows]

    def stats(self, query: RecordQuery, bucket: str) -> list[dict[str, Any]]:
        """Per bucket (UTC hour or day) and category: inspected, NG, reviewed, confirmed defects, false alarms
        (NG judged good) and misses (OK judged defect)."""
        t = inspections.c
        size = BUCKET_MS[bucket]
        start = (t.created_ms // size) * size  # floor division, rendered for each dialect

        def count(cond: Any) -> Any:
            return func.sum(case((cond, 1), else_=0))

        stmt = (select(start.label("bucket"), t.category, func.count().label("inspected"),
                       count(t.is_anomalous.is_(True)).label("ng"),
                       count(t.review_label.is_not(None)).label("reviewed"),
                       count(and_(t.is_anomalous.is_(True), t.review_label == "defect")).label("confirmed_defects"),
                       count(and_(t.is_anomalous.is_(True), t.review_label == "good")).label("false_alarms"),
                       count(and_(t.is_anomalous.is_(False), t.review_label == "defect")).label("misses"))
                .where(*_where(query)).group_by(start, t.category).order_by(start, t.category))
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return [{"bucket_ms": int(r.bucket), "category": r.category,
                 **{k: int(getattr(r, k)) for k in ("inspected", "ng", "reviewed", "confirmed_defects",
                                                      "false_alarms", "misses")}} for r in rows]

    def reviewed(self, category: str) -> list[InspectionRecord]:
        """A category's judged records, oldest first: what `learn` turns into references and a threshold."""
        t = inspections.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(inspections).where(t.category == category, t.review_label.is_not(None))
                                .order_by(t.created_ms, t.id)).all()
        return [_row_to_record(r) for r in rows]

    def threshold_history(self, category: str, limit: int = 200) -> list[ThresholdChange]:
        """Newest first."""
        c = threshold_changes.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(threshold_changes).where(c.category == category)
                                .order_by(c.at_ms.desc(), c.id.desc()).limit(limit)).all()
        return [ThresholdChange(r.category, r.source, r.threshold, r.previous, r.actor, r.detail, r.at_ms)
                for r in rows]

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(inspections)).scalar_one())
