"""`filo line --check`: the file validated, then every camera, PLC, broker, the service and the spool reached
once, one line each, each within `CHECK_TIMEOUT_S`. Nothing is signalled and no image is taken."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from filo_line.build import build_plc_io, build_publishers, build_source
from filo_line.client import ServiceClient, ServiceError
from filo_line.config import LineConfig, StationConfig
from filo_line.spool import MIB, Spool

CHECK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class CheckLine:
    ok: bool
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.what}: {self.detail}"


def unknown_categories(config: LineConfig, known: list[str]) -> list[str]:
    """One "field: reason" line per station whose category the service does not know."""
    names = ", ".join(sorted(known)) or "none"
    return [f"stations[{i}].category: {s.category!r} is not a category the service knows (it knows: {names})"
            for i, s in enumerate(config.stations) if s.category not in known]


async def _line(what: str, probe: Callable[[], Awaitable[str]]) -> CheckLine:
    try:
        return CheckLine(True, what, await asyncio.wait_for(probe(), CHECK_TIMEOUT_S))
    except asyncio.TimeoutError:
        return CheckLine(False, what, f"no answer within {CHECK_TIMEOUT_S:.0f} s")
    except Exception as exc:  # every failure is this line's verdict, never the end of the check
        return CheckLine(False, what, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _port_free(host: str, port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))  # OSError: in use (a connector already running?)
    return f"{host}:{port} free for /metrics"


async def run_checks(config: LineConfig) -> list[CheckLine]:
    lines: list[CheckLine] = []
    client = ServiceClient(config.service.url, config.service.key)
    try:
        try:
            known = await client.categories(CHECK_TIMEOUT_S)
        except ServiceError as exc:
            lines.append(CheckLine(False, "service", str(exc)))
        else:
            unknown = unknown_categories(config, known)
            lines.append(CheckLine(not unknown, "service",
                                   f"{config.service.url} answers; " + ("; ".join(unknown) if unknown else
                                   "knows " + ", ".join(sorted({s.category for s in config.stations})))))
    finally:
        await client.close()
    spool = Spool(config.spool.dir, int(config.spool.max_mb * MIB))
    lines.append(await _line("spool", lambda: asyncio.to_thread(spool.check)))
    lines.append(await _line("metrics", lambda: asyncio.to_thread(_port_free, config.metrics.host,
                                                                   config.metrics.port)))
    for station in config.stations:
        lines.append(await _line(f"{station.name} camera", lambda s=station: build_source(s.camera).check()))
        if station.plc is not None:
            lines.append(await _line(f"{station.name} plc", lambda s=station: _check_plc(s)))
        for publisher in build_publishers(station):
            lines.append(await _line(f"{station.name} publish {publisher.kind}",
                                     lambda p=publisher: asyncio.to_thread(p.check, CHECK_TIMEOUT_S / 2)))
    return lines


async def _check_plc(station: StationConfig) -> str:
    io = build_plc_io(station.plc)
    await io.connect()
    try:
        return await io.check()
    finally:
        await io.close()
