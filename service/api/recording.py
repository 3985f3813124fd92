"""What an answered inspection leaves behind: the record the route hands to the backend's `Records`.

Built from the response the client got, so the record says exactly what was answered. The artefacts
(the uploaded bytes as sent, the heatmap as rendered) are attached only when the keep policy says so.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from service.core.imaging import Heatmap, HeatmapSpec, ImageInfo
from service.records.model import Artefact, InspectionRecord, now_ms
from service.records.policy import keeps_artefacts, might_keep
from service.settings import FiloSettings

RECORD_HEATMAP = HeatmapSpec("jpeg", "frame")  # rendered for the record when the client asked for none


def record_heatmap_spec(asked: HeatmapSpec, settings: FiloSettings, record: bool) -> tuple[HeatmapSpec, bool]:
    """The heatmap to ask the backend for, and whether the client gets it: a client that asked for none
    still gets none, but the record may keep one."""
    if asked.wanted or not (record and settings.records and might_keep(settings.records_keep)):
        return asked, asked.wanted
    return RECORD_HEATMAP, False


def build_record(body: dict[str, Any], source: str | None, image: bytes, info: ImageInfo,
                 heatmap: Heatmap | None, settings: FiloSettings) -> InspectionRecord:
    artefacts: list[Artefact] = []
    heatmap_kind = None
    if keeps_artefacts(settings.records_keep, settings.records_ok_sample, body["is_anomalous"]):
        artefacts.append(Artefact("image", Image.MIME.get(info.format.upper(), "application/octet-stream"), image))
        if heatmap is not None:
            artefacts.append(Artefact("heatmap", heatmap.media_type, heatmap.data))
            heatmap_kind = heatmap.kind  # overlay (jpeg, png) or the raw map: readers need not guess
    return InspectionRecord(
        id=body["request_id"], created_ms=now_ms(), category=body["category"], score=body["score"],
        is_anomalous=body["is_anomalous"], needs_review=body["needs_review"], threshold=body["threshold"],
        threshold_source=body["threshold_source"], references=body["references"], position=body["position"],
        boxes=body["boxes"], top_types=body["top_types"], model_version=str(body["model"].get("version", "")),
        timing_ms=body["timing_ms"], source=source, artefacts=artefacts, heatmap_kind=heatmap_kind,
    )


def needs_review(score: float, threshold: float, margin: float) -> bool:
    """Within the category's review band around the threshold (a margin of 0: never)."""
    return margin > 0 and abs(score - threshold) <= margin
