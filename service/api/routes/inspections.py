"""Inspection records: list, read, export, count and judge them (docs/records.md).

Reads need a reader, reviewer or admin key (a camera key inspects only); judging needs a reviewer or admin
key. A limited key reads and judges its own categories' and sources' records only: lists, exports and counts
leave the others out, a direct read of one is 403. The store is reached through the backend's `records` only;
times are ISO-8601 (UTC when no offset is given).
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from service.api.auth import Reader, Reviewer, scoped
from service.api.deps import BackendDep
from service.api.schemas import (
    ERROR_RESPONSES,
    InspectionPageOut,
    InspectionRecordOut,
    ReviewHistoryOut,
    StatsOut,
)
from service.backends.base import Backend
from service.core.errors import ServiceError
from service.core.security import Principal
from service.workflows import records as recs
from service.workflows.records import (
    CSV_COLUMNS,
    LABELS,
    PART_ID_PATTERN,
    SOURCE_PATTERN,
    Cursor,
    InspectionRecord,
    RecordQuery,
    Review,
    csv_row,
    iso,
    now_ms,
)

router = APIRouter(prefix="/v1", tags=["records"])
MAX_LIMIT = 500
RecordId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class Filters(BaseModel):
    """The filters every records read takes (list, export, stats)."""

    model_config = ConfigDict(extra="forbid")

    category: str | None = Field(None, min_length=1, max_length=128)
    source: str | None = Field(None, pattern=SOURCE_PATTERN)
    part_id: str | None = Field(None, pattern=PART_ID_PATTERN, description="the line's id of the part")
    verdict: Literal["ok", "ng"] | None = None
    reviewed: bool | None = None
    needs_review: bool | None = None
    since: datetime | None = Field(None, description="ISO-8601 time, inclusive (UTC without an offset)")
    until: datetime | None = Field(None, description="ISO-8601 time, exclusive")

    def query(self) -> RecordQuery:
        return RecordQuery(self.category, self.source, self.verdict, self.reviewed, self.needs_review,
                           epoch_ms(self.since), epoch_ms(self.until), self.part_id)


def epoch_ms(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp() * 1000)


class Page(Filters):
    limit: int = Field(50, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(None, max_length=200, description="next_cursor of the previous page, as given "
                               "(opaque; any other value is refused with 422 invalid_cursor)")


class StatsFilters(Filters):
    bucket: Literal["hour", "day"] = "hour"


class ReviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: Literal["defect", "good"] = Field(..., description=f"one of {LABELS}")
    defect_type: str | None = Field(None, max_length=200, description="what the defect is (free text)")
    note: str | None = Field(None, max_length=2000)


@router.get("/inspections", response_model=InspectionPageOut, responses=ERROR_RESPONSES,
            summary="Inspection records, newest first (keyset pages)")
async def list_inspections(page: Annotated[Page, Query()], backend: BackendDep, who: Reader) -> dict[str, Any]:
    try:
        cursor = Cursor.decode(page.cursor) if page.cursor else None
    except ValueError:
        raise ServiceError(422, "invalid_cursor", "cursor is not one this server gave out (pass next_cursor as is)",
                           details={"fields": [{"field": "cursor", "message": "not a cursor"}]}) from None
    items, nxt = await recs.records_of(backend).list(scoped(page.query(), who), page.limit, cursor)
    return {"items": [r.out() for r in items], "next_cursor": nxt.encode() if nxt else None}


def _cell(value: Any) -> str:
    """A CSV cell a spreadsheet shows as text: a leading = + - @ (a formula) is neutralised with a quote."""
    text = str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


@router.get("/inspections/export", responses={**ERROR_RESPONSES, 200: {"content": {"text/csv": {}}}},
            response_class=Response, summary="The filtered records as CSV (streamed)")
async def export_inspections(filters: Annotated[Filters, Query()], backend: BackendDep, who: Reader) -> Response:
    records = recs.records_of(backend)
    first = records.export(scoped(filters.query(), who))
    head = await anext(first)  # fails here (503) rather than mid-stream when the database is away

    async def rows() -> AsyncIterator[str]:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        page: list[InspectionRecord] | None = head
        while page is not None:
            for record in page:
                writer.writerow([_cell(v) for v in csv_row(record)])
            yield out.getvalue()
            out.seek(0)
            out.truncate()
            page = await anext(first, None)

    return StreamingResponse(rows(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": 'attachment; filename="inspections.csv"'})


@router.get("/stats", response_model=StatsOut, responses=ERROR_RESPONSES, summary="Counts per time bucket and category")
async def stats(filters: Annotated[StatsFilters, Query()], backend: BackendDep, who: Reader) -> dict[str, Any]:
    rows = await recs.records_of(backend).stats(scoped(filters.query(), who), filters.bucket)
    return {"bucket": filters.bucket,
            "items": [{"bucket_start": iso(r.pop("bucket_ms")), **r} for r in rows]}


@router.get("/inspections/{record_id}", response_model=InspectionRecordOut, responses=ERROR_RESPONSES, summary="One inspection record")
async def get_inspection(record_id: RecordId, backend: BackendDep, who: Reader) -> dict[str, Any]:
    return (await _record(backend, record_id, who)).out()


async def _record(backend: Backend, record_id: str, who: Principal) -> InspectionRecord:
    """The record, where `who` reaches it (403 `outside_key_limits` otherwise; 404 when there is none)."""
    found = await recs.record(backend, record_id)
    who.check_record(found.category, found.source)
    return found


async def _artefact(backend: Backend, record_id: str, kind: str, who: Principal) -> Response:
    if who.limited:  # the record says whether its bytes are the key's to see
        await _record(backend, record_id, who)
    art = await recs.artefact(backend, record_id, kind)
    return Response(art.data, media_type=art.media_type, headers={"Cache-Control": "private, max-age=3600"})


@router.get("/inspections/{record_id}/image", response_class=Response, responses=ERROR_RESPONSES,
            summary="The uploaded image, where it was kept")
async def get_image(record_id: RecordId, backend: BackendDep, who: Reader) -> Response:
    return await _artefact(backend, record_id, "image", who)


@router.get("/inspections/{record_id}/heatmap", response_class=Response, responses=ERROR_RESPONSES,
            summary="The heatmap, where it was kept")
async def get_heatmap(record_id: RecordId, backend: BackendDep, who: Reader) -> Response:
    return await _artefact(backend, record_id, "heatmap", who)


@router.post("/inspections/{record_id}/review", response_model=InspectionRecordOut, responses=ERROR_RESPONSES,
             summary="Judge an inspection: defect or good (reviewer or admin key)")
async def review(record_id: RecordId, body: ReviewIn, backend: BackendDep, who: Reviewer) -> dict[str, Any]:
    if who.limited:
        await _record(backend, record_id, who)
    judged = Review(body.label, body.defect_type or None, body.note or None, who.name, now_ms())
    return (await recs.review(backend, record_id, judged)).out()


@router.get("/inspections/{record_id}/reviews", response_model=ReviewHistoryOut, responses=ERROR_RESPONSES,
            summary="Every judgement of an inspection, oldest first")
async def review_history(record_id: RecordId, backend: BackendDep, who: Reader) -> dict[str, Any]:
    await _record(backend, record_id, who)
    return {"items": [r.out() for r in await recs.records_of(backend).reviews(record_id)]}
