"""The configuration's kinds made into objects: sources, PLC transports and handshakes, publishers.

The only place that names the protocol modules, and it imports them when a station asks for them: a line with
folders and no PLC runs without asyncua, pymodbus or Aravis installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from filo_line.config import FolderCamera, FolderPublish, GenicamCamera, ModbusPlc, MqttPublish, OpcUaPlc, StationConfig
from filo_line.metrics import LineMetrics
from filo_line.plc.base import PlcIO
from filo_line.publish.base import Publisher
from filo_line.sources.base import Source
from filo_line.station import Handshake


def build_source(camera: FolderCamera | GenicamCamera) -> Source:
    if isinstance(camera, FolderCamera):
        from filo_line.sources.folder import FolderSource

        return FolderSource(camera.path, camera.pattern)
    from filo_line.sources.genicam import GenicamSource

    return GenicamSource(camera.id, camera.trigger)


def build_plc_io(plc: OpcUaPlc | ModbusPlc) -> PlcIO:
    if isinstance(plc, OpcUaPlc):
        from filo_line.plc.opcua import OpcUaIO

        return OpcUaIO(plc.endpoint, plc.signal_map())
    from filo_line.plc.modbus import ModbusIO

    return ModbusIO(plc.host, plc.port, plc.unit, plc.signal_map(), plc.part_id_register)


def build_handshake(io: PlcIO) -> Handshake:
    from filo_line.plc.handshake import PlcHandshake

    return PlcHandshake(io)


def build_publishers(station: StationConfig, metrics: LineMetrics | None = None) -> list[Publisher]:
    out: list[Publisher] = []
    for i, spec in enumerate(station.publish):
        on_drop: Callable[[], None] | None = None
        if metrics is not None:
            on_drop = metrics.publish_dropped.labels(station.name, spec.kind).inc
        if isinstance(spec, MqttPublish):
            from filo_line.publish.mqtt import MqttPublisher, shown_url

            on_state = None
            if metrics is not None:
                gauge = metrics.broker_connected.labels(station.name, f"{shown_url(spec.url)} {spec.topic}")
                gauge.set(0)
                on_state = lambda up, g=gauge: g.set(1 if up else 0)  # noqa: E731
            out.append(MqttPublisher(spec.url, spec.topic, spec.qos, client_id=f"filo-line-{station.name}-{i}-{os.getpid()}",
                                     on_state=on_state, on_drop=on_drop))
        elif isinstance(spec, FolderPublish):
            from filo_line.publish.folder import FolderPublisher

            out.append(FolderPublisher(spec.path, on_drop=on_drop))
    return out
