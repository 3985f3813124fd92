"""Prometheus metrics of one process (API or worker), on a registry of its own.

The metric names are a contract with the deployment's Grafana dashboard: do not rename them.
Each app or worker gets its own `CollectorRegistry` (never the global one) so that tests can
build several apps in one process and each `/metrics` shows only its own process.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ENGINE_INFO_LABELS = ("device", "precision", "encoder", "cuda_graphs", "grounding", "deformable_attention", "warnings")


class Metrics:
    """Every metric FiLo Inspect exports; one instance per process-level app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_duration = Histogram(
            "filo_http_request_duration_seconds",
            "HTTP request duration by route template, method and status",
            ["route", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter("filo_requests_total", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.queue_wait = Histogram("filo_queue_wait_seconds", "time a request waited before its batch ran",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.model_seconds = Histogram("filo_model_seconds", "wall time of one engine batch",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("filo_batch_size", "requests per engine batch", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("filo_queue_depth", "requests queued or in progress", registry=r)
        self.inflight = Gauge("filo_inflight_requests", "HTTP requests being handled", registry=r)
        self.errors = Counter("filo_errors_total", "errors answered, by error code", ["reason"], registry=r)
        self.workers = Gauge("filo_workers", "inspection workers alive (heartbeat within the last 10 s)",
                             registry=r)
        self.gpu_memory = Gauge("filo_gpu_memory_bytes", "GPU memory allocated by torch", registry=r)
        self.engine_info = Gauge(
            "filo_engine_info", "1 for what this process's engine runs: device, precision, image encoder "
            "(compiled/eager), CUDA graphs, Grounding DINO (compiled/eager/off) and its deformable attention "
            "(triton/hub/pytorch/off); warnings counts the slow paths it started with", list(ENGINE_INFO_LABELS),
            registry=r)
        self.catalog_regressions = Counter(
            "filo_catalog_version_regressions_total", "times the category catalog's version in Redis went "
            "backwards (Redis lost it and an older one was published); each is healed and logged", registry=r)
        self.catalog_restores = Counter("filo_catalog_restores_total", "category catalogs re-published into Redis, "
                                        "by where from (worker snapshot, database)", ["source"], registry=r)
        self.records_written = Counter("filo_records_written_total", "inspection records written to the database",
                                       registry=r)
        self.records_pending = Gauge("filo_records_pending", "inspection records accepted, not yet in the database "
                                     "(this process's buffer; queue mode: plus the hand-off stream)", registry=r)
        self.records_failed = Counter("filo_records_failed_total", "records whose write failed, by reason "
                                      "(retried: kept and tried again, each record counted once; dropped: lost)",
                                      ["reason"], registry=r)
        self.records_write_failures = Counter(
            "filo_records_write_failures_total", "failed attempts to write a batch of records, by cause (disk_full, "
            "unreachable, locked, io_error, not_migrated, stream_full, redis_unavailable, ...)", ["cause"], registry=r)

        self.rescued = Counter(
            "filo_worker_rescued_total", "requests this worker took over from other workers, by how: heartbeat (a "
            "dead worker's, as soon as its heartbeat lapsed) or idle_claim (the backstop: pending past claim_idle_ms)",
            ["how"], registry=r)

    def error(self, reason: str) -> None:
        self.errors.labels(reason=reason).inc()

    def observe_batch(self, size: int, model_s: float, queue_waits_s: list[float]) -> None:
        """Record one engine batch; called where batches run (embedded app or worker)."""
        self.batch_size.observe(size)
        self.model_seconds.observe(model_s)
        for wait in queue_waits_s:
            self.queue_wait.observe(max(0.0, wait))

    def set_engine_info(self, runtime: dict) -> None:
        """Publish the engine's runtime report (service/engine/runtime.py) as `filo_engine_info`'s labels."""
        self.engine_info.clear()
        labels = {key: str(runtime.get(key, "unknown")) for key in ENGINE_INFO_LABELS if key != "warnings"}
        self.engine_info.labels(**labels, warnings=str(len(runtime.get("warnings") or ()))).set(1)

    def update_gpu_memory(self, device: str) -> None:
        """Set `filo_gpu_memory_bytes` when the engine runs on CUDA; a no-op on CPU."""
        if not device.startswith("cuda"):
            return
        import torch

        if torch.cuda.is_available():
            self.gpu_memory.set(torch.cuda.memory_allocated(torch.device(device)))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
