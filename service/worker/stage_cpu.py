"""The CPU a worker spends outside the model, by stage (decode, prepare, render, encode): the counter
`filo_worker_cpu_seconds_total{stage}` that `filo bench --service` reads."""

from __future__ import annotations

import time

from prometheus_client import Counter

from service.core.telemetry import Metrics


class StageCPU:
    def __init__(self, metrics: Metrics) -> None:
        self.counter = Counter("filo_worker_cpu_seconds_total", "worker CPU outside the model, by stage",
                               ["stage"], registry=metrics.registry)

    def count(self, stage: str, since: float) -> float:
        """Add this thread's CPU since `since` (a `time.thread_time()`) to `stage`; returns the time now."""
        now = time.thread_time()
        self.counter.labels(stage=stage).inc(now - since)
        return now
