"""A worker's answer to one entry: the result, the heatmap the request asked for, or the error, encoded.

Runs in a worker thread per entry after the batch; the worker holds the decoded image, so the API process never
decodes it. The heatmap is drawn by the serving step the embedded server uses too (service/engine/serving.py).
"""

from __future__ import annotations

import time
from typing import Any

from service.core.errors import error_from_slot
from service.core.imaging import HeatmapSpec
from service.core.telemetry import Metrics
from service.core.types import InspectRequest, InspectResult
from service.engine import serving
from service.queue.protocol import Entry, Reply, error_dict, result_to_dict
from service.worker.stage_cpu import StageCPU


def reply_bytes(e: Entry, req: InspectRequest, value: Any, model: dict[str, Any], wait_s: float, model_s: float,
                metrics: Metrics, cpu: StageCPU) -> bytes:
    reply = Reply(e.request_id, model=model, queue_wait_ms=wait_s * 1e3, model_ms=model_s * 1e3)
    if isinstance(value, InspectResult):
        reply.result = result_to_dict(value)
        t = time.thread_time()
        try:
            reply.heatmap = serving.result_heatmap(req.image, value, HeatmapSpec.from_dict(e.params.get("heatmap")))
        finally:
            cpu.count("render", t)
        if e.params.get("want_map", False):
            reply.anomaly_map = value.anomaly_map
            reply.map_encoding = str(e.params.get("map_encoding") or "uint8")
    else:
        err = error_from_slot(value)
        metrics.error(err.code)
        reply.error = error_dict(err.code, err.message, err.status)
    t = time.thread_time()
    try:
        return reply.encode()
    finally:
        cpu.count("encode", t)


def failed_reply(e: Entry, exc: BaseException) -> bytes:
    """Building the answer failed: the result is lost to this request alone."""
    return Reply(e.request_id, error=error_dict("inspection_failed", f"building the answer failed: "
                                                f"{type(exc).__name__}", 500)).encode()
