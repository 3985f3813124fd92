"""The inspection record as a sink of finished inspections (service/core/finished.py): the first of them.

The record is built from the same `FinishedInspection` the reply is shaped from, so it says exactly what was
answered. The artefacts (the uploaded bytes as sent, the heatmap as rendered) are attached only when the keep
policy says so (`FILO_RECORDS_KEEP`, service/records/policy.py); a client that asked for no heatmap still gets
none, but the record may keep one (`heatmap_wanted`).
"""

from __future__ import annotations

from PIL import Image

from service.core.finished import FinishedInspection
from service.core.imaging import HeatmapSpec
from service.records.model import Artefact, InspectionRecord
from service.records.policy import keeps_artefacts, might_keep
from service.records.recorder import Records
from service.settings import FiloSettings

RECORD_HEATMAP = HeatmapSpec("jpeg", "frame")  # rendered for the record when the client asked for none


def build_record(finished: FinishedInspection, settings: FiloSettings) -> InspectionRecord:
    result = finished.result
    artefacts: list[Artefact] = []
    heatmap_kind = None
    if keeps_artefacts(settings.records_keep, settings.records_ok_sample, result.is_anomalous):
        media_type = Image.MIME.get(finished.image.format.upper(), "application/octet-stream")
        artefacts.append(Artefact("image", media_type, finished.image_bytes))
        if finished.heatmap is not None:
            artefacts.append(Artefact("heatmap", finished.heatmap.media_type, finished.heatmap.data))
            heatmap_kind = finished.heatmap.kind  # overlay (jpeg, png) or the raw map: readers need not guess
    return InspectionRecord(
        id=finished.request_id, created_ms=finished.created_ms, category=finished.category, score=result.score,
        is_anomalous=result.is_anomalous, needs_review=result.needs_review,
        threshold=float(result.threshold if result.threshold is not None else 0.0),
        threshold_source=result.threshold_source, references=result.references, position=result.position,
        boxes=finished.boxes(), top_types=finished.top_types(),
        model_version=str(finished.model.get("version", "")), timing_ms=dict(finished.timing_ms),
        source=finished.source, part_id=finished.part_id, key_name=finished.key_name, artefacts=artefacts,
        heatmap_kind=heatmap_kind,
    )


class RecordSink:
    """Keeps a record of every finished inspection whose client did not say `record=false`."""

    name = "records"

    def __init__(self, records: Records, settings: FiloSettings) -> None:
        self.records = records
        self.settings = settings

    def heatmap_wanted(self, record: bool) -> HeatmapSpec | None:
        return RECORD_HEATMAP if record and might_keep(self.settings.records_keep) else None

    def submit(self, finished: FinishedInspection) -> None:
        if finished.record:  # a buffer append (service/records/buffer.py): off the answer's path
            self.records.submit(build_record(finished, self.settings))
