"""The seam where a finished inspection goes: one value, handed to every sink, the same in both modes.

Everything that happens to an answered inspection beyond the reply hangs off `InspectionSink`: today the
inspection record (service/records/sink.py); a line signal, an MQTT message or a webhook is one more sink.
The inspect workflow (service/workflows/inspection.py) builds one `FinishedInspection` per answered request,
after the backend answered and before the route shapes its reply, and hands it to each sink; the route shapes
the reply from the same value, so what a sink sees is exactly what the client was told.

A sink's `submit` is called on the request's event loop and must not block or raise into the answer: it hands
the value to its own buffer or task (the records buffer is the model). A sink that needs a heatmap the client
did not ask for says so through `heatmap_wanted`, before the inspection runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from service.core.imaging import Heatmap, HeatmapSpec, ImageInfo
from service.core.types import InspectResult


@dataclass(frozen=True)
class FinishedInspection:
    request_id: str
    category: str
    result: InspectResult  # score, the verdict the engine decided (is_anomalous, needs_review, threshold), boxes
    image: ImageInfo  # the upload's size and format
    image_bytes: bytes  # the upload as sent
    heatmap: Heatmap | None  # as rendered: the client's, or the one a sink asked for (`heatmap_wanted`)
    model: dict[str, Any]  # the model's description (`version`, backbone, ...)
    timing_ms: dict[str, float]  # queue_wait, model, total
    created_ms: int  # wall-clock time of the answer, ms since the epoch
    source: str | None = None  # the request's `source` (a line, a camera); None: not given
    part_id: str | None = None  # the line's id of the inspected part; None: not given
    key_name: str | None = None  # the name of the API key that asked (an open server's caller: "anonymous")
    record: bool = True  # the client's wish that the inspection be kept (`record=false`: not)
    extra: dict[str, Any] = field(default_factory=dict)  # what a caller adds for its own sinks

    def boxes(self) -> list[dict[str, Any]]:
        """The boxes in original pixels, clipped to the image (a detector may reach a little past its edge)."""
        w, h = self.image.width, self.image.height
        return [{"x1": min(max(b.x1, 0.0), w), "y1": min(max(b.y1, 0.0), h),
                 "x2": min(max(b.x2, 0.0), w), "y2": min(max(b.y2, 0.0), h),
                 "phrase": b.phrase, "confidence": b.confidence, "valid": b.valid} for b in self.result.boxes]

    def top_types(self) -> list[dict[str, Any]]:
        return [{"description": t.description, "similarity": t.similarity} for t in self.result.top_types]


class InspectionSink(Protocol):
    name: str

    def heatmap_wanted(self, record: bool) -> HeatmapSpec | None:
        """The heatmap this sink keeps when the client asked for none (None: it needs none); `record` is the
        request's wish to be kept."""
        ...

    def submit(self, finished: FinishedInspection) -> None:
        """Take the inspection; never block, never raise into the answer."""
        ...
