"""The plain data of a record, shared by the API, the hand-off stream and the store (no SQLAlchemy here)."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Literal

SOURCE_PATTERN = r"^[A-Za-z0-9\-_.:/]{1,64}$"
PART_ID_PATTERN = SOURCE_PATTERN  # a PLC serial or a file stem: the same safe characters
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # what a record id may be (GET /v1/inspections/{id})
LABELS = ("defect", "good")
Label = Literal["defect", "good"]
HEATMAP_KINDS = ("overlay", "map")
HeatmapKind = Literal["overlay", "map"]  # a server-blended overlay (jpeg, png) or the raw 8-bit map (map)


def now_ms() -> int:
    return int(time.time() * 1000)


def iso(ms: int | None) -> str | None:
    """UTC ISO-8601 with milliseconds: what every time in the records API looks like."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Artefact:
    kind: Literal["image", "heatmap"]
    media_type: str
    data: bytes


@dataclass
class Review:
    label: Label
    defect_type: str | None
    note: str | None
    reviewer: str
    reviewed_ms: int

    def out(self) -> dict[str, Any]:
        return {"label": self.label, "defect_type": self.defect_type, "note": self.note,
                "reviewer": self.reviewer, "reviewed_at": iso(self.reviewed_ms)}


@dataclass
class InspectionRecord:
    """One answered inspection, as kept. `id` is the request id: writing it twice is writing it once."""

    id: str
    created_ms: int
    category: str
    score: float
    is_anomalous: bool
    needs_review: bool
    threshold: float
    threshold_source: str
    references: int
    position: str | None
    boxes: list[dict[str, Any]]
    top_types: list[dict[str, Any]]
    model_version: str
    timing_ms: dict[str, float]
    source: str | None = None
    artefacts: list[Artefact] = field(default_factory=list)  # what the keep policy chose to store
    has_image: bool = False
    has_heatmap: bool = False
    review: Review | None = None
    # which picture the kept heatmap is (`Heatmap.kind`); None where none was kept, and on records kept
    # before it was recorded (migration 0003)
    heatmap_kind: HeatmapKind | None = None
    part_id: str | None = None  # the line's id of the inspected part (a PLC serial, a file stem)
    key_name: str | None = None  # the name of the API key that made the inspection

    def out(self) -> dict[str, Any]:
        """The JSON the records API answers."""
        return {
            "id": self.id, "created_at": iso(self.created_ms), "category": self.category, "source": self.source,
            "part_id": self.part_id, "key_name": self.key_name,
            "score": self.score, "is_anomalous": self.is_anomalous, "needs_review": self.needs_review,
            "threshold": self.threshold, "threshold_source": self.threshold_source, "references": self.references,
            "position": self.position, "boxes": self.boxes, "top_types": self.top_types,
            "model_version": self.model_version, "timing_ms": self.timing_ms,
            "has_image": self.has_image, "has_heatmap": self.has_heatmap, "heatmap_kind": self.heatmap_kind,
            "review": self.review.out() if self.review else None,
        }

    def to_wire(self) -> dict[str, bytes]:
        """Fields of one entry of the records hand-off stream: JSON metadata, artefacts as raw bytes.

        The heatmap's kind travels beside the heatmap (`heatmap:kind`), not in the metadata: a pod of an
        older version draining the stream ignores a field it does not know, while a metadata key it does not
        know would make it drop the whole entry as unreadable."""
        meta = asdict(self)
        meta.pop("artefacts")
        meta.pop("review")
        meta.pop("heatmap_kind")
        wire: dict[str, bytes] = {"id": self.id.encode(), "meta": json.dumps(meta).encode()}
        for art in self.artefacts:
            wire[f"{art.kind}:type"] = art.media_type.encode()
            wire[art.kind] = art.data
            if art.kind == "heatmap" and self.heatmap_kind is not None:
                wire["heatmap:kind"] = self.heatmap_kind.encode()
        return wire

    @classmethod
    def from_wire(cls, entry: dict[bytes, bytes]) -> InspectionRecord:
        """An entry back; one written before the heatmap's kind was recorded loads with `heatmap_kind` None."""
        # a metadata key a newer pod added is not worth losing the record over: read the keys this version has
        meta = {k: v for k, v in json.loads(entry[b"meta"]).items() if k in _META_KEYS}
        arts = [Artefact(kind, entry[f"{kind}:type".encode()].decode(), entry[kind.encode()])  # type: ignore[arg-type]
                for kind in ("image", "heatmap") if kind.encode() in entry]
        kind = entry.get(b"heatmap:kind", b"").decode() if b"heatmap" in entry else ""
        # a kind this version does not know is not worth losing the record over: kept as unknown (None)
        return cls(**meta, artefacts=arts, heatmap_kind=kind if kind in HEATMAP_KINDS else None)  # type: ignore[arg-type]


# what to_wire writes in an entry's metadata (the rest travels in fields of its own)
_META_KEYS = frozenset(f.name for f in fields(InspectionRecord)) - {"artefacts", "review", "heatmap_kind"}


@dataclass(frozen=True)
class RecordQuery:
    """The filters every records read shares (list, export, stats)."""

    category: str | None = None
    source: str | None = None
    verdict: Literal["ok", "ng"] | None = None
    reviewed: bool | None = None
    needs_review: bool | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    part_id: str | None = None
    # a limited key's reach (docs/records.md, Keys, roles and limits): only records of these categories and
    # sources, whatever the filters above ask; None: no limit
    allowed_categories: tuple[str, ...] | None = None
    allowed_sources: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the next page starts strictly after (older than) this record."""

    created_ms: int
    id: str

    def encode(self) -> str:
        return base64.urlsafe_b64encode(f"{self.created_ms}:{self.id}".encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        ms, _, ident = raw.partition(":")
        if not ident:
            raise ValueError("not a cursor")
        return cls(int(ms), ident)


@dataclass
class ThresholdChange:
    """One change of a category's threshold, kept for good: who, when, from what, and what it was before."""

    category: str
    source: str  # manual | calibrated | learned | references | removed
    threshold: float | None
    previous: float | None
    actor: str
    detail: dict[str, Any] = field(default_factory=dict)
    at_ms: int = field(default_factory=now_ms)

    def out(self) -> dict[str, Any]:
        return {"at": iso(self.at_ms), "actor": self.actor, "source": self.source, "threshold": self.threshold,
                "previous": self.previous, "detail": self.detail}


CSV_COLUMNS = ("id", "created_at", "category", "source", "part_id", "key_name", "score", "is_anomalous", "needs_review", "threshold",
               "threshold_source", "references", "position", "top_type", "boxes", "model_version",
               "review_label", "review_defect_type", "review_note", "reviewer", "reviewed_at")


def csv_row(record: InspectionRecord) -> list[Any]:
    review = record.review
    return [record.id, iso(record.created_ms), record.category, record.source or "", record.part_id or "",
            record.key_name or "", f"{record.score:.6f}",
            record.is_anomalous, record.needs_review, f"{record.threshold:.6f}", record.threshold_source,
            record.references, record.position or "",
            record.top_types[0]["description"] if record.top_types else "", len(record.boxes), record.model_version,
            review.label if review else "", (review.defect_type or "") if review else "",
            (review.note or "") if review else "", review.reviewer if review else "",
            iso(review.reviewed_ms) if review else ""]
