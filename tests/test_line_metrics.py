"""The connector's Prometheus endpoint: the series the dashboard's "Line connector" row reads, served over HTTP."""

from __future__ import annotations

import httpx

from filo_line.metrics import METRIC_NAMES, LineMetrics
from tests.service_fixtures import free_port
from tests.test_deploy import LINE_METRICS


def exported(metrics: LineMetrics) -> set[str]:
    names = set()
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            names.add(family.name if family.type == "histogram" else sample.name)
    return names


def test_every_series_is_exported_from_the_start_and_is_the_one_the_dashboard_reads():
    metrics = LineMetrics()
    metrics.station("cam1", has_plc=True)
    metrics.spool_changed(0, 0)
    metrics.service_errors.labels("cam1", "timeout")
    metrics.spool_dropped.labels("full")
    metrics.broker_connected.labels("cam1", "mqtt://127.0.0.1:1883 t").set(1)
    metrics.publish_dropped.labels("cam1", "mqtt")
    metrics.late_verdicts.labels("cam1", "ok")
    assert exported(metrics) == METRIC_NAMES == LINE_METRICS
    value = metrics.registry.get_sample_value
    assert value("filo_line_parts_total", {"station": "cam1", "verdict": "timeout"}) == 0
    assert value("filo_line_deadline_misses_total", {"station": "cam1"}) == 0
    assert value("filo_line_plc_connected", {"station": "cam1"}) == 0


def test_the_endpoint_serves_them_over_http_and_closes():
    metrics = LineMetrics()
    metrics.station("cam1", has_plc=False)
    metrics.parts.labels("cam1", "ok").inc(3)
    metrics.latency.labels("cam1").observe(0.12)
    port = free_port()
    metrics.serve(port, "127.0.0.1")
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    finally:
        metrics.close()
    assert 'filo_line_parts_total{station="cam1",verdict="ok"} 3.0' in text
    assert 'filo_line_signal_latency_seconds_bucket{le="0.15",station="cam1"} 1.0' in text
    assert "filo_line_plc_connected{" not in text  # a station without a PLC shows no PLC state
