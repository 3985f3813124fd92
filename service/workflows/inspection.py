"""One inspection through the backend, and the finished inspection handed to every sink, from one place.

The backend's engine has decided the verdict (`InspectResult.is_anomalous`, `needs_review`, `threshold`):
nothing here decides it again. What this adds is the seam (service/core/finished.py): one `FinishedInspection`
per answered request, handed to each configured sink (the records first), and returned for the route to
shape its answer from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from service.backends.base import Backend, InspectJob
from service.core.finished import FinishedInspection, InspectionSink
from service.core.imaging import HeatmapSpec, ImageInfo
from service.records.model import now_ms
from service.records.sink import RecordSink
from service.settings import FiloSettings

log = logging.getLogger(__name__)


class Sinks:
    """The sinks of a process, fed in order; one that fails is logged and the others still get the value."""

    def __init__(self, sinks: Sequence[InspectionSink] = ()) -> None:
        self.sinks = list(sinks)

    def heatmap_for(self, asked: HeatmapSpec, record: bool) -> HeatmapSpec:
        """The heatmap to render: the client's, or, where it asked for none, the first a sink keeps."""
        if asked.wanted:
            return asked
        for sink in self.sinks:
            wanted = sink.heatmap_wanted(record)
            if wanted is not None:
                return wanted
        return asked

    def submit(self, finished: FinishedInspection) -> None:
        for sink in self.sinks:
            try:
                sink.submit(finished)
            except Exception:  # a sink's failure is its own: the answer and the other sinks go on
                log.exception("sink %s could not take inspection %s", sink.name, finished.request_id)


def default_sinks(backend: Backend, settings: FiloSettings) -> Sinks:
    """A server's sinks: the inspection records where it keeps them. A new sink is added here (or passed to
    `create_app`) and gets every finished inspection of both modes."""
    return Sinks([RecordSink(backend.records, settings)] if backend.records is not None else [])


async def inspect(backend: Backend, sinks: Sinks, job: InspectJob, image: ImageInfo, started: float,
                  source: str | None, record: bool, part_id: str | None = None, key_name: str | None = None
                  ) -> FinishedInspection:
    """Run `job` (its `heatmap` is what the client asked for) and hand the result to the sinks.

    `started` is the request's `time.monotonic()` arrival, for the total time. Errors of the backend (4xx/5xx
    `ServiceError`) pass through: a request that was not answered reaches no sink.
    """
    job.heatmap = sinks.heatmap_for(job.heatmap, record)
    outcome = await backend.inspect(job)
    finished = FinishedInspection(
        request_id=job.request_id, category=job.category, result=outcome.result, image=image,
        image_bytes=job.image_bytes, heatmap=outcome.heatmap, model=outcome.model,
        timing_ms={"queue_wait": outcome.queue_wait_ms, "model": outcome.model_ms,
                   "total": (time.monotonic() - started) * 1e3},
        created_ms=now_ms(), source=source, part_id=part_id, key_name=key_name, record=record)
    sinks.submit(finished)
    return finished
