"""`filo line`: every station of the file running until SIGTERM or SIGINT, and `--check`.

Start-up refuses what cannot work (a bad file, a category the service does not know) with the field named and
exit status 2; a service that is away at start is not a refusal (the line runs on the fail-safe and the spool
until it is back), so its categories are checked when it answers. A station whose source fails stops the
connector (exit 1) so that systemd restarts it; everything waiting is on disk (spool, processing/).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from filo_line.build import build_handshake, build_plc_io, build_publishers, build_source
from filo_line.check import run_checks, unknown_categories
from filo_line.client import Failure, Outcome, ServiceClient, ServiceError
from filo_line.config import ConfigError, LineConfig, load_config
from filo_line.metrics import LineMetrics
from filo_line.publish.base import Publisher
from filo_line.replay import Replayer
from filo_line.report import Signalled
from filo_line.sources.base import SourceError
from filo_line.spool import MIB, Spool, SpoolMeta
from filo_line.station import Station

log = logging.getLogger("filo.line")

START_CHECK_TIMEOUT_S = 5.0


async def verify_categories(config: LineConfig, client: ServiceClient) -> None:
    """Raise ConfigError when the service answers and does not know a station's category."""
    try:
        known = await client.categories(START_CHECK_TIMEOUT_S)
    except ServiceError as exc:
        log.warning("cannot ask the service for its categories (%s); the stations start on the fail-safe", exc)
        return
    problems = unknown_categories(config, known)
    if problems:
        raise ConfigError("the service", problems)


async def run_line(config: LineConfig, stop: asyncio.Event, metrics: LineMetrics | None = None,
                   serve_metrics: bool = True) -> None:
    metrics = metrics or LineMetrics()
    if serve_metrics:
        metrics.serve(config.metrics.port, config.metrics.host)
    client = ServiceClient(config.service.url, config.service.key)
    publishers: list[Publisher] = []
    try:
        await verify_categories(config, client)
        spool = Spool(config.spool.dir, int(config.spool.max_mb * MIB), on_change=metrics.spool_changed,
                      on_drop=lambda reason: metrics.spool_dropped.labels(reason).inc())
        await asyncio.to_thread(spool.open)
        stations: dict[str, Station] = {}
        plc_stop = asyncio.Event()  # set once the stations are done: their last parts still need the PLC
        plc_jobs = []
        for sc in config.stations:
            handshake = None
            if sc.plc is not None:
                handshake = build_handshake(build_plc_io(sc.plc))
                plc_jobs.append(handshake.keep_connected(plc_stop))
            station_publishers = build_publishers(sc, metrics)
            for p in station_publishers:
                p.start()
            publishers += station_publishers
            stations[sc.name] = Station(sc, build_source(sc.camera), client, spool, station_publishers, metrics,
                                        handshake)

        def late(meta: SpoolMeta, outcome: Outcome, image: bytes) -> None:
            station = stations.get(meta.station)
            if station is None:
                log.warning("spool: part %s of station %s, which this file no longer has: not published",
                            meta.part_id, meta.station)
                return
            station.report_late(part_id=meta.part_id, request_id=meta.request_id, outcome=outcome,
                                triggered_at=meta.triggered_at, signalled_at=meta.signalled_at,
                                signalled=Signalled(**meta.signalled) if meta.signalled else None,
                                image_name=meta.image_name, image=image)

        def replay_failed(meta: SpoolMeta, failure: Failure) -> None:
            metrics.service_errors.labels(meta.station, failure.reason).inc()

        replayer = Replayer(spool, client, late, replay_failed)
        plc_tasks = [asyncio.ensure_future(j) for j in plc_jobs]
        tasks = [asyncio.ensure_future(s.run(stop)) for s in stations.values()]
        tasks.append(asyncio.ensure_future(replayer.run(stop)))
        log.info("line running: %s; spool %s (%d waiting)", ", ".join(stations), spool.dir, spool.depth)
        failed: list[asyncio.Future] = []
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if not t.cancelled() and t.exception() is not None]
        finally:
            stop.set()
            await asyncio.wait(tasks, timeout=30)  # the parts in flight are concluded by their deadlines
            plc_stop.set()
            if plc_tasks:
                await asyncio.wait(plc_tasks, timeout=10)
            for t in tasks + plc_tasks:
                if not t.done():
                    t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*tasks, *plc_tasks, return_exceptions=True)
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
    finally:
        for p in publishers:
            await asyncio.to_thread(p.stop, 2.0)
        await client.close()
        metrics.close()


async def _run_until_signalled(config: LineConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await run_line(config, stop)


def main(config_path: str | None = None, check_path: str | None = None, log_level: str = "info") -> int:
    logging.basicConfig(level=getattr(logging, log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request: the metrics count them
    path = check_path or config_path
    assert path is not None
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"filo line: {exc}", file=sys.stderr)
        if check_path:
            print(f"FAIL  config {path}: refused", file=sys.stdout)
        return 1 if check_path else 2
    if check_path:
        n = len(config.stations)
        print(f"ok    config {path}: {n} station{'' if n == 1 else 's'} ({', '.join(s.name for s in config.stations)})")
        lines = asyncio.run(run_checks(config))
        for line in lines:
            print(line, flush=True)
        return 0 if all(line.ok for line in lines) else 1
    try:
        asyncio.run(_run_until_signalled(config))
    except ConfigError as exc:
        print(f"filo line: {exc}", file=sys.stderr)
        return 2
    except (SourceError, OSError) as exc:
        print(f"filo line: {exc}", file=sys.stderr)
        return 1
    return 0
