"""The inspection records as the records routes and `learn` reach them: through the backend's `Records`, with
one answer where a server keeps none (404 `records_disabled`) and where a record is unknown or purged."""

from __future__ import annotations

from service.backends.base import Backend
from service.core.errors import ServiceError
from service.records.model import (
    CSV_COLUMNS,
    LABELS,
    PART_ID_PATTERN,
    SOURCE_PATTERN,
    Artefact,
    Cursor,
    InspectionRecord,
    RecordQuery,
    Review,
    csv_row,
    iso,
    now_ms,
)
from service.records.recorder import Records

__all__ = ["CSV_COLUMNS", "LABELS", "PART_ID_PATTERN", "SOURCE_PATTERN", "Artefact", "Cursor", "InspectionRecord", "RecordQuery",
           "Review", "artefact", "csv_row", "iso", "now_ms", "record", "records_of", "review"]


def records_of(backend: Backend) -> Records:
    if backend.records is None:
        raise ServiceError(404, "records_disabled", "inspection records are off on this server (FILO_RECORDS=false)")
    return backend.records


async def record(backend: Backend, record_id: str) -> InspectionRecord:
    found = await records_of(backend).get(record_id)
    if found is None:
        raise ServiceError(404, "unknown_inspection", f"no inspection record {record_id!r} (unknown or purged)")
    return found


async def artefact(backend: Backend, record_id: str, kind: str) -> Artefact:
    art = await records_of(backend).artefact(record_id, kind)
    if art is None:
        await record(backend, record_id)  # 404 unknown_inspection first, when that is the reason
        raise ServiceError(404, "artefact_not_kept", f"the {kind} of {record_id!r} was not kept (FILO_RECORDS_KEEP)")
    return art


async def review(backend: Backend, record_id: str, judged: Review) -> InspectionRecord:
    done = await records_of(backend).review(record_id, judged)
    if done is None:
        raise ServiceError(404, "unknown_inspection", f"no inspection record {record_id!r} (unknown or purged)")
    return done
