"""The connector's own Prometheus endpoint (`metrics.port`), on a registry of its own.

What a line engineer watches: parts by station and verdict, missed signals (must stay 0), the trigger-to-signal
latency, the service's failures by reason, the spool, and whether the PLC and the brokers are connected. The
Grafana dashboard's "Line connector" row (deploy/grafana/dashboards/filo.json) reads exactly these.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from filo_line.decision import VERDICT_LABELS

# seconds; a deadline is typically 0.2 to 2 s
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class LineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.parts = Counter("filo_line_parts", "parts signalled (or published, without a PLC), by the verdict: "
                             "ok, ng, timeout (no verdict in time), error", ["station", "verdict"], registry=r)
        self.late_verdicts = Counter("filo_line_late_verdicts", "verdicts that came after the part's deadline "
                                     "(from the spool or a backlog), published with late: true, never signalled",
                                     ["station", "verdict"], registry=r)
        self.deadline_misses = Counter("filo_line_deadline_misses", "parts whose PLC signal was not written by "
                                       "their deadline (must stay 0)", ["station"], registry=r)
        self.unsignalled = Counter("filo_line_unsignalled_parts", "images older than their deadline when the "
                                   "connector first saw them (written while it was away): inspected, never "
                                   "signalled", ["station"], registry=r)
        self.latency = Histogram("filo_line_signal_latency_seconds", "from the trigger (a file whole, a frame, the "
                                 "PLC's Trigger) to the result written to the PLC", ["station"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.service_errors = Counter("filo_line_service_errors", "failed calls to the service by reason: timeout, "
                                      "refused, busy, unavailable, unreachable, server_error",
                                      ["station", "reason"], registry=r)
        self.spool_depth = Gauge("filo_line_spool_depth", "images waiting in the spool", registry=r)
        self.spool_bytes = Gauge("filo_line_spool_bytes", "bytes the spool holds", registry=r)
        self.spool_dropped = Counter("filo_line_spool_dropped", "images the spool could not keep or deliver: full, "
                                     "io (the disk refused), refused (the service never will), unreadable",
                                     ["reason"], registry=r)
        self.plc_connected = Gauge("filo_line_plc_connected", "1 while the station's PLC is connected",
                                   ["station"], registry=r)
        self.broker_connected = Gauge("filo_line_broker_connected", "1 while the MQTT broker is connected",
                                      ["station", "target"], registry=r)
        self.publish_dropped = Counter("filo_line_publish_dropped", "reports a publisher dropped (its queue was "
                                       "full while its target was away)", ["station", "kind"], registry=r)
        self._server: Any = None

    def station(self, name: str, has_plc: bool) -> None:
        """Make a station's series exist at zero from its start, so rates and alerts see them."""
        for verdict in VERDICT_LABELS:
            self.parts.labels(name, verdict)
        self.deadline_misses.labels(name)
        self.unsignalled.labels(name)
        self.latency.labels(name)
        if has_plc:
            self.plc_connected.labels(name).set(0)

    def spool_changed(self, depth: int, size: int) -> None:
        self.spool_depth.set(depth)
        self.spool_bytes.set(size)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """The HTTP endpoint (`/metrics`), in a daemon thread."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# every series name the endpoint exports (the dashboard check in tests/test_deploy.py uses the same list)
METRIC_NAMES = frozenset({
    "filo_line_parts_total", "filo_line_late_verdicts_total", "filo_line_deadline_misses_total",
    "filo_line_unsignalled_parts_total", "filo_line_signal_latency_seconds", "filo_line_service_errors_total",
    "filo_line_spool_depth", "filo_line_spool_bytes", "filo_line_spool_dropped_total", "filo_line_plc_connected",
    "filo_line_broker_connected", "filo_line_publish_dropped_total",
})
