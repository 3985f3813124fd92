"""Helpers for the line connector's tests: a PLC that records every write, a real mosquitto on a free loopback
port and a subscriber to it, images written the way a camera writes them, and a station run in a test.

Every process started here is stopped by whoever started it (the fixtures' finalizers), every wait is bounded.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt

from filo_line.client import ServiceClient
from filo_line.config import StationConfig
from filo_line.metrics import LineMetrics
from filo_line.plc.base import PlcError
from filo_line.plc.handshake import PlcHandshake
from filo_line.sources.folder import FolderSource
from filo_line.spool import Spool
from filo_line.station import Station
from tests.service_fixtures import free_port, png_bytes, stop_process, wait_until

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


# --- a PLC playing its part of the handshake ----------------------------------------------------------------


@dataclass
class Result:
    """One result as the PLC saw it when ResultReady rose."""

    part_id: str
    ok: bool
    ng: bool
    error: bool
    at: float  # time.time()


@dataclass
class FakePlc:
    """A `PlcIO` that records every write and answers like a PLC program: it acknowledges ResultReady after
    `ack_delay_s`, drops Ack when ResultReady falls, and drops Trigger once TriggerReady falls. `down` makes
    every call fail as a disconnected PLC does."""

    ack_delay_s: float = 0.0
    down: bool = False
    values: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(
        ("trigger_ready", "trigger", "result_ready", "ok", "ng", "error", "ack"), False))
    part_id: str = ""
    writes: list[tuple[float, dict[str, bool]]] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    trigger_ready_writes: list[bool] = field(default_factory=list)
    _connected: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def connected(self) -> bool:
        return self._connected and not self.down

    async def connect(self) -> None:
        if self.down:
            raise PlcError("fake PLC: connection refused")
        self._connected = True

    async def close(self) -> None:
        self._connected = False

    def _alive(self) -> None:
        if not self.connected:
            raise PlcError("fake PLC: not connected")

    async def read_bool(self, signal: str) -> bool:
        self._alive()
        return self.values[signal]

    async def write_bools(self, values: dict[str, bool]) -> None:
        self._alive()
        with self._lock:
            rising = values.get("result_ready") and not self.values["result_ready"]
            self.values.update(values)
            self.writes.append((time.time(), dict(values)))
            if "trigger_ready" in values:
                self.trigger_ready_writes.append(values["trigger_ready"])
                if not values["trigger_ready"]:
                    self.values["trigger"] = False
            if rising:
                v = self.values
                self.results.append(Result(self.part_id, v["ok"], v["ng"], v["error"], time.time()))
        if rising:  # the PLC program acknowledges on its next scan
            asyncio.get_running_loop().call_later(self.ack_delay_s, self.values.__setitem__, "ack", True)
        if values.get("result_ready") is False:
            self.values["ack"] = False

    async def read_part_id(self) -> str:
        self._alive()
        return self.part_id

    async def write_part_id(self, part_id: str) -> None:
        self._alive()
        self.part_id = part_id

    async def check(self) -> str:
        self._alive()
        return "fake PLC: every signal read"

    def trigger(self, part_id: str) -> None:
        """The PLC's side of a trigger: PartId written, then Trigger raised."""
        self.part_id = part_id
        self.values["trigger"] = True


def make_handshake(io: Any) -> PlcHandshake:
    """The handshake `filo line` runs, over the fake PLC."""
    return PlcHandshake(io)


# --- mosquitto ------------------------------------------------------------------------------------------------


class Broker:
    """A real mosquitto bound to 127.0.0.1 on a free port; `stop()` and `start()` again on the same port."""

    def __init__(self, tmp: Path, persistent: bool = False) -> None:
        """`persistent`: sessions and their queued messages survive a restart (saved when it stops)."""
        self.port = free_port()
        self.conf = tmp / "mosquitto.conf"
        keep = f"persistence true\npersistence_location {tmp}/\n" if persistent else "persistence false\n"
        # run as whoever started it (started as root, mosquitto would switch to its own user, who cannot write
        # the test's folder; started as anyone else, the option changes nothing)
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
                             f"{keep}")
        self.log = tmp / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Broker:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._listening, 10, what=f"mosquitto on {self.port}")
        return self

    def _listening(self) -> bool:
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        stop_process(self.proc)


class Subscriber:
    """Collects every JSON message on a topic (QoS 1)."""

    def __init__(self, broker: Broker, topic: str, session: str | None = None) -> None:
        """`session`: a persistent session of that client id, which the broker keeps while this is away."""
        self.messages: list[dict[str, Any]] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=session or f"test-sub-{time.time_ns()}",
                                  clean_session=session is None)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.append(json.loads(m.payload))
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("no SUBACK from mosquitto")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- images and stations ----------------------------------------------------------------------------------------


def write_image(folder: Path, name: str, seed: int, data: bytes | None = None) -> bytes:
    """Write an image the way a camera's FTP upload does: create, write, close (inotify's close-write)."""
    data = png_bytes(seed=seed) if data is None else data
    with open(folder / name, "wb") as f:
        f.write(data)
    return data


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def station_config(name: str = "cam1", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": name, "category": "bottle", "deadline_ms": 1500}
    base.update(fields)
    return base


# --- a station in a test -----------------------------------------------------------------------------------------

KEY = "k-line"  # the line's key: a camera key (FILO_API_KEYS), which inspects and reads the catalog
READER_KEY = "k-qa"  # a reader key (FILO_READER_KEYS): the tests read the records with it


def records(url: str, part_id: str) -> list[dict]:
    r = httpx.get(f"{url}/v1/inspections", params={"part_id": part_id},
                  headers={"Authorization": f"Bearer {READER_KEY}"},
                  timeout=10)
    r.raise_for_status()
    return r.json()["items"]


@dataclass
class Rig:
    station: Station
    plc: FakePlc | None
    metrics: LineMetrics
    spool: Spool
    folder: Path
    client: ServiceClient

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, {"station": "cam1", **labels}) or 0.0


SIGNALS = ("trigger_ready", "trigger", "part_id", "result_ready", "ok", "ng", "error", "ack")


def make_rig(tmp_path: Path, url: str, *, plc: bool = True, triggered: bool = False, publishers: list | None = None,
             spool_mb: float = 50, **fields: object) -> Rig:
    folder = tmp_path / "in"
    folder.mkdir(parents=True, exist_ok=True)
    if plc:  # the transport is the fake; the file's PLC section says how the station uses it
        fields["plc"] = {"kind": "opcua", "endpoint": "opc.tcp://127.0.0.1:4840", "triggered": triggered,
                         "nodes": {k: f"ns=2;s=Cam1.{k}" for k in SIGNALS}}
    config = StationConfig.model_validate(station_config(
        camera={"kind": "folder", "path": str(folder), "pattern": "*.png"}, **fields))
    metrics = LineMetrics()
    spool = Spool(tmp_path / "spool", int(spool_mb * 1024 * 1024), on_change=metrics.spool_changed,
                  on_drop=lambda r: metrics.spool_dropped.labels(r).inc())
    spool.open()
    client = ServiceClient(url, KEY)
    fake = FakePlc() if plc else None
    station = Station(config, FolderSource(folder, "*.png"), client, spool, publishers or [], metrics,
                      make_handshake(fake) if fake else None)
    return Rig(station, fake, metrics, spool, folder, client)


def run(rig: Rig, scenario: Callable[[], Awaitable[None]]) -> None:
    """The station and its handshake as `filo line` runs them, until `scenario` returns; then the station stops
    first (its last parts still need the PLC) and the handshake after it."""

    async def main() -> None:
        stop, plc_stop = asyncio.Event(), asyncio.Event()
        station = asyncio.create_task(rig.station.run(stop))
        jobs = [station]
        if rig.station.handshake is not None:
            jobs.append(asyncio.create_task(rig.station.handshake.keep_connected(plc_stop)))
        for p in rig.station.publishers:
            p.start()
        try:
            await wait_for(lambda: rig.station.source.watching, 10, "the folder watched")
            await scenario()
        finally:
            stop.set()
            await asyncio.wait_for(station, 30)
            plc_stop.set()
            await asyncio.wait_for(asyncio.gather(*jobs), 30)
            for p in rig.station.publishers:
                await asyncio.to_thread(p.stop, 5.0)
            await rig.client.close()

    asyncio.run(main())


def deadlines_met(rig: Rig, written_at: dict[str, float]) -> None:
    """Each part's one result reached the PLC within its deadline, counted from when its file was written."""
    deadline = rig.station.deadline_s
    for r in rig.plc.results:
        assert r.at - written_at[r.part_id] <= deadline, (r, written_at[r.part_id])
    assert rig.sample("filo_line_deadline_misses_total") == 0
