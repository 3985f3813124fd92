"""Trigger-to-signal latency of one line station (`filo line`), at a few part rates, bounded in time.

Starts `filo serve --embedded` (the demo profile unless the environment says otherwise) on loopback, or uses
`--url`, runs one station in this process against it, and triggers parts at each rate for `--seconds`: the time
from the trigger (a file written whole into the station's folder) to the result written to the PLC, as the PLC
sees it, p50 and p99, with the count of fail-safes and of missed signals (which must be 0). Prints a Markdown
table (docs/line.md keeps the figures and this command):

    python -m filo_lab.bench.line --rates 2 5 10 --seconds 20

The source and the PLC are parameters (`--source`, `--plc`), each a small rig in `SOURCES` / `PLCS`: `folder`
and `fake` (a PLC that acknowledges at once and records when each result reached it) today; a camera or a
protocol's test server is one more entry.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from filo_lab.bench.load import start_stack
from filo_lab.bench.stack import IMAGE_SIZES, encode_image, photo_like
from filo_line.client import ServiceClient
from filo_line.config import StationConfig
from filo_line.metrics import LineMetrics
from filo_line.sources.base import Source
from filo_line.sources.folder import FolderSource
from filo_line.spool import MIB, Spool
from filo_line.station import Station


class FolderFeed:
    """The camera's side of a folder source: one file written (and closed) per trigger."""

    name = "folder"

    def __init__(self, tmp: Path) -> None:
        self.folder = tmp / "camera"
        self.folder.mkdir()

    def source(self) -> Source:
        return FolderSource(self.folder, "*.jpg")

    def camera(self) -> dict:
        return {"kind": "folder", "path": str(self.folder), "pattern": "*.jpg"}

    def ready(self, source: Source) -> bool:
        return bool(getattr(source, "watching", True))

    def trigger(self, part_id: str, image: bytes) -> float:
        with open(self.folder / f"{part_id}.jpg", "wb") as f:
            f.write(image)
        return time.time()


@dataclass
class _Report:
    acked: bool
    write_ms: float
    ack_ms: float | None


@dataclass
class RecordingPlc:
    """The PLC's side of the handshake, in memory: connected, acknowledges at once, records when each result
    reached it (a protocol's rig replaces it with the real handshake over a test server)."""

    name: str = "fake"
    results: list[tuple[str, bool, float]] = field(default_factory=list)  # part id, Error, time.time()
    connected: bool = True

    async def set_trigger_ready(self, ready: bool) -> None:
        return None

    async def wait_trigger(self, stop: asyncio.Event | None = None) -> str:
        raise NotImplementedError("the fake PLC does not trigger parts")

    async def keep_connected(self, stop: asyncio.Event) -> None:
        await stop.wait()

    async def signal(self, part_id: str, ok: bool, error: bool) -> _Report:
        self.results.append((part_id, error, time.time()))
        return _Report(True, 0.0, 0.0)


SOURCES: dict[str, Callable[[Path], FolderFeed]] = {"folder": FolderFeed}
PLCS: dict[str, Callable[[], RecordingPlc]] = {"fake": RecordingPlc}


@dataclass
class RateResult:
    rate: float
    parts: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    fail_safes: int
    missed: int


async def run_rate(url: str, key: str, category: str, source_kind: str, plc_kind: str, rate: float, seconds: float,
                   image: bytes, deadline_ms: int, warmup: int = 3) -> RateResult:
    with tempfile.TemporaryDirectory(prefix="filo-bench-line-") as tmp_name:
        tmp = Path(tmp_name)
        feed, plc = SOURCES[source_kind](tmp), PLCS[plc_kind]()
        config = StationConfig.model_validate({"name": "bench", "category": category, "deadline_ms": deadline_ms,
                                               "camera": feed.camera()})
        metrics = LineMetrics()
        spool = Spool(tmp / "spool", 512 * MIB)
        spool.open()
        client = ServiceClient(url, key)
        source = feed.source()
        station = Station(config, source, client, spool, [], metrics, plc)
        stop = asyncio.Event()
        task = asyncio.create_task(station.run(stop))
        try:
            while not feed.ready(source):
                await asyncio.sleep(0.02)
            for i in range(warmup):  # the first inferences warm the service up: not measured
                await asyncio.to_thread(feed.trigger, f"warm-{i}", image)
            await _until(lambda: len(plc.results) >= warmup, deadline_ms / 1000 * warmup + 30)
            plc.results.clear()
            n = max(1, round(rate * seconds))
            triggered: dict[str, float] = {}
            t0 = time.monotonic()
            for i in range(n):
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
                part_id = f"p{i:05d}"
                triggered[part_id] = await asyncio.to_thread(feed.trigger, part_id, image)
            await _until(lambda: len(plc.results) + _missed(metrics) >= n, deadline_ms / 1000 + 30)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
            await client.close()
    latencies = np.array([(at - triggered[pid]) * 1000 for pid, _, at in plc.results if pid in triggered])
    missed = n - len(latencies)  # every part without a result: those counted as missed, and any lost
    return RateResult(rate, len(latencies), float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)),
                      float(latencies.max()), sum(1 for pid, error, _ in plc.results if error and pid in triggered),
                      missed)


def _missed(metrics: LineMetrics) -> int:
    return int(metrics.registry.get_sample_value("filo_line_deadline_misses_total", {"station": "bench"}) or 0)


async def _until(predicate: Callable[[], bool], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"not all parts were signalled within {timeout_s:.0f} s")
        await asyncio.sleep(0.02)


def table(source: str, plc: str, deadline_ms: int, rows: list[RateResult]) -> str:
    out = ["| source | PLC | parts/s | parts | p50 ms | p99 ms | max ms | fail-safes | missed signals |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {source} | {plc} | {r.rate:g} | {r.parts} | {r.p50_ms:.0f} | {r.p99_ms:.0f} | {r.max_ms:.0f} "
                   f"| {r.fail_safes} | {r.missed} |")
    out.append(f"\ndeadline {deadline_ms} ms")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[2.0, 5.0, 10.0], help="parts per second")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long each rate runs")
    ap.add_argument("--source", choices=sorted(SOURCES), default="folder")
    ap.add_argument("--plc", choices=sorted(PLCS), default="fake")
    ap.add_argument("--deadline-ms", type=int, default=1500)
    ap.add_argument("--image", choices=sorted(IMAGE_SIZES), default="1MP", help="a camera's JPEG of this size")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--url", help="a running service (default: start `filo serve --embedded`, demo profile)")
    ap.add_argument("--key", default=os.environ.get("FILO_LINE_KEY", "bench"))
    ap.add_argument("--image-size", type=int, default=None,
                    help="the started service's model input size (FILO_IMAGE_SIZE; default: the profile's)")
    ap.add_argument("--grounding", choices=["on", "off"], default=None,
                    help="the started service's Grounding DINO (FILO_GROUNDING; default: the profile's)")
    args = ap.parse_args(argv)
    image = encode_image(photo_like(*IMAGE_SIZES[args.image], seed=0), "JPEG")

    def measure(url: str) -> list[RateResult]:
        return [asyncio.run(run_rate(url, args.key, args.category, args.source, args.plc, rate, args.seconds,
                                     image, args.deadline_ms)) for rate in args.rates]

    if args.url:
        rows = measure(args.url)
    else:
        logs = Path(tempfile.mkdtemp(prefix="filo-bench-line-"))
        env = {"FILO_PROFILE": os.environ.get("FILO_PROFILE", "demo"), "FILO_STATE_DIR": str(logs / "state")}
        if args.image_size:
            env["FILO_IMAGE_SIZE"] = str(args.image_size)
        if args.grounding:
            env["FILO_GROUNDING"] = "true" if args.grounding == "on" else "false"
        with contextlib.ExitStack() as stack:
            served = stack.enter_context(start_stack("embedded", env, logs))
            rows = measure(served.api_url)
    print(table(args.source, args.plc, args.deadline_ms, rows))


if __name__ == "__main__":
    main()
