"""`filo line` as a command, against `filo serve --embedded` in a process of its own, so that the service can be
paused (SIGSTOP) and the connector killed (-9): a bad file or an unknown category refused at start and by
--check, every part signalled by its deadline while the service is paused, and every image recorded exactly once
after a kill -9 with files waiting and a full spool."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from service.cli import main as filo
from tests.line_fakes import KEY, READER_KEY, Broker, make_rig, records, run, wait_for, write_image
from tests.service_fixtures import REPO, free_port, stop_process, wait_ready, wait_until, worker_env


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture(scope="module")
def serve(tmp_path_factory) -> Iterator[ServeProcess]:
    state = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = worker_env({"FILO_PROFILE": "demo", "FILO_IMAGE_SIZE": "224", "FILO_GROUNDING": "false",
                      "FILO_MAX_WAIT_MS": "5", "FILO_API_KEYS": f'["line:{KEY}"]',
                      "FILO_READER_KEYS": f'["qa:{READER_KEY}"]', "FILO_STATE_DIR": str(state),
                      "FILO_HOST": "127.0.0.1", "FILO_PORT": str(port)})
    log = state / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--embedded"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    server = ServeProcess(proc, port, log)
    try:
        wait_ready(server.url, 120)
    except TimeoutError:
        proc.kill()
        raise AssertionError(log.read_text(errors="replace")[-3000:]) from None
    yield server
    server.resume()
    stop_process(proc, 20)


def line_file(tmp_path: Path, url: str, stations: list[dict], spool_mb: float = 50, **extra: object) -> Path:
    data = {"service": {"url": url, "key": "${TEST_LINE_KEY}"},
            "spool": {"dir": str(tmp_path / "spool"), "max_mb": spool_mb},
            "metrics": {"port": free_port(), "host": "127.0.0.1"}, "stations": stations, **extra}
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def folder_station(folder: Path, name: str = "cam1", category: str = "bottle", **fields: object) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    return {"name": name, "category": category, "deadline_ms": 800,
            "camera": {"kind": "folder", "path": str(folder), "pattern": "*.png"}, **fields}


# --- refusals and --check ---------------------------------------------------------------------------------------


def test_check_reaches_everything_one_line_each_and_names_an_unknown_category(tmp_path, serve, capsys, monkeypatch):
    monkeypatch.setenv("TEST_LINE_KEY", KEY)
    broker = Broker(tmp_path).start()
    try:
        good = folder_station(tmp_path / "cam1", publish=[{"kind": "mqtt", "url": broker.url, "topic": "t/cam1"},
                                                          {"kind": "folder", "path": str(tmp_path / "sorted")}])
        path = line_file(tmp_path, serve.url, [good])
        assert filo(["line", "--check", str(path)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert [line.split(":")[0] for line in out] == [
            f"ok    config {path}", "ok    service", "ok    spool", "ok    metrics", "ok    cam1 camera",
            "ok    cam1 publish mqtt", "ok    cam1 publish folder"]
        assert "knows bottle" in out[1] and "connected" in out[5]

        broker.stop()  # a broker away, a category the service does not know, a PLC nobody plays
        bad = folder_station(tmp_path / "cam2", name="cam2", category="bolt",
                             plc={"kind": "opcua", "endpoint": f"opc.tcp://127.0.0.1:{free_port()}",
                                  "nodes": {k: f"ns=2;s={k}" for k in ("part_id", "result_ready", "ok", "ng",
                                                                        "error", "ack")}})
        path = line_file(tmp_path, serve.url, [good, bad])
        assert filo(["line", "--check", str(path)]) == 1
        out = capsys.readouterr().out.splitlines()
        service_line = next(line for line in out if " service: " in line)
        assert service_line.startswith("FAIL") and "stations[1].category: 'bolt' is not a category the service" \
            in service_line
        assert next(line for line in out if "cam1 publish mqtt" in line).startswith("FAIL")
        assert next(line for line in out if "cam2 plc" in line).startswith("FAIL")
        assert next(line for line in out if "cam2 camera" in line).startswith("ok")
    finally:
        broker.stop()


def test_a_bad_file_and_an_unknown_category_are_refused_at_start_with_the_field(tmp_path, serve, capsys,
                                                                                monkeypatch):
    monkeypatch.setenv("TEST_LINE_KEY", KEY)
    path = line_file(tmp_path, serve.url, [folder_station(tmp_path / "cam1", category="bolt")])
    assert filo(["line", "--config", str(path)]) == 2
    assert "stations[0].category: 'bolt' is not a category the service knows" in capsys.readouterr().err

    path.write_text(path.read_text().replace("deadline_ms: 800", "deadline_ms: 800\n  colour: red"))
    assert filo(["line", "--config", str(path)]) == 2
    assert "stations[0].colour: unknown key" in capsys.readouterr().err
    assert filo(["line", "--check", str(path)]) == 1
    assert "FAIL  config" in capsys.readouterr().out

    monkeypatch.delenv("TEST_LINE_KEY")
    assert filo(["line", "--config", str(line_file(tmp_path, serve.url, [folder_station(tmp_path / "c")]))]) == 2
    assert "service.key: environment variable TEST_LINE_KEY is not set" in capsys.readouterr().err


# --- the service paused ----------------------------------------------------------------------------------------


def test_a_paused_service_gets_every_part_the_fail_safe_by_its_deadline_and_one_record_later(tmp_path, serve):
    """SIGSTOP: connections are accepted and nothing answers. The parts get NG + Error by their deadline; after
    SIGCONT the service may still run the requests it had taken, and the replay sends them again with the same
    request ids: one record per part, whichever came first."""
    rig = make_rig(tmp_path, serve.url, deadline_ms=800)
    written: dict[str, float] = {}

    async def scenario() -> None:
        write_image(rig.folder, "before.png", 1)
        await wait_for(lambda: len(rig.plc.results) == 1, 30, "a verdict before the pause")
        serve.pause()
        try:
            for i in range(3):
                write_image(rig.folder, f"paused-{i}.png", 10 + i)
                written[f"paused-{i}"] = time.time()
            await wait_for(lambda: len(rig.plc.results) == 4 and rig.spool.depth == 3, 30, "three fail-safes")
        finally:
            serve.resume()

    run(rig, scenario)
    before, *paused = rig.plc.results
    assert before.error is False
    assert [(r.part_id, r.ng, r.error) for r in paused] == [(f"paused-{i}", True, True) for i in range(3)]
    for r in paused:
        assert r.at - written[r.part_id] <= 0.8
    assert rig.sample("filo_line_deadline_misses_total") == 0

    from filo_line.client import ServiceClient
    from filo_line.replay import Replayer

    async def replay() -> None:
        client = ServiceClient(serve.url, KEY)
        stop = asyncio.Event()
        late: list[str] = []
        task = asyncio.create_task(Replayer(rig.spool, client, lambda m, o, i: late.append(m.part_id)).run(stop))
        await wait_for(lambda: rig.spool.depth == 0, 60, "the spool replayed")
        stop.set()
        await task
        await client.close()
        assert sorted(late) == [f"paused-{i}" for i in range(3)]

    asyncio.run(replay())
    for part in ("before", "paused-0", "paused-1", "paused-2"):
        wait_until(lambda p=part: len(records(serve.url, p)) >= 1, 30, what=f"the record of {part}")
        assert len(records(serve.url, part)) == 1, part


# --- kill -9 with files waiting and a full spool ------------------------------------------------------------------


def connector(path: Path, log: Path) -> subprocess.Popen:
    env = worker_env({"TEST_LINE_KEY": KEY})
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "service.cli", "line", "--config", str(path)], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def metric(port: int, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} " if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_after_kill_9_with_files_waiting_and_a_full_spool_every_image_is_recorded_exactly_once(tmp_path, serve):
    folder = tmp_path / "cam1"
    entry_bytes = len(write_image(tmp_path, "probe.png", 999)) + 600  # an entry: the image and its meta
    path = line_file(tmp_path, serve.url, [folder_station(folder, name="killcam")],
                     spool_mb=3.5 * entry_bytes / (1024 * 1024))  # room for three entries
    config = yaml.safe_load(path.read_text())
    metrics_port = config["metrics"]["port"]
    log = tmp_path / "connector.log"
    first = connector(path, log)
    names = [f"k-{i}" for i in range(8)]
    try:
        wait_until(lambda: "line running" in log.read_text(), 30, what="the connector started")
        serve.pause()  # the service away: five parts for a spool of three
        for i, name in enumerate(names[:5]):
            write_image(folder, f"{name}.png", 500 + i)
        wait_until(lambda: len(list((folder / "done").glob("*.png"))) == 3
                   and len(list((folder / "failed").glob("*.png"))) == 2, 30, what="three spooled, two refused")
        assert metric(metrics_port, "filo_line_spool_depth") == 3
        assert metric(metrics_port, "filo_line_spool_dropped_total", reason="full") == 2
        first.send_signal(signal.SIGSTOP)  # files waiting that the connector has not taken
        for i, name in enumerate(names[5:], 5):
            write_image(folder, f"{name}.png", 500 + i)
        first.kill()
        first.wait(10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.kill()
        serve.resume()
    assert len(list((tmp_path / "spool" / "entries").glob("*.json"))) == 3
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{n}.png" for n in names[5:]]
    refused = sorted(folder.joinpath("failed").glob("*.png"))
    assert all("spool" in Path(f"{p}.reason.txt").read_text() for p in refused)
    for p in refused:  # what the reason tells the operator: put it back
        shutil.move(p, folder / p.name)
        Path(f"{p}.reason.txt").unlink()

    second = connector(path, log)
    try:
        wait_until(lambda: len(list((folder / "done").glob("*.png"))) == 8
                   and not list((tmp_path / "spool" / "entries").glob("*.json")), 90,
                   what="every image inspected (spool replayed, waiting files taken)")
        for name in names:
            wait_until(lambda n=name: len(records(serve.url, n)) >= 1, 30, what=f"the record of {name}")
        assert {name: len(records(serve.url, name)) for name in names} == dict.fromkeys(names, 1)
        assert all(r["source"] == "killcam" for name in names for r in records(serve.url, name))
    finally:
        second.send_signal(signal.SIGTERM)
        try:
            assert second.wait(30) == 0, log.read_text()[-3000:]
        finally:
            with contextlib.suppress(ProcessLookupError):
                second.kill()
    assert not list((folder / "processing").iterdir()) and not list((folder / "failed").glob("*.png"))
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


# --- the whole way, with a Modbus TCP PLC ---------------------------------------------------------------------------


def test_filo_line_signals_a_modbus_plc_that_triggers_each_part(tmp_path, serve):
    """`filo line --config` as installed: a pymodbus server plays the PLC (tests/test_line_plc.py's stand-in), a
    folder is the camera, the service judges. The PLC triggers three parts and reads, for each, its own part id
    with exactly one of OK and NG, no Error, and the verdict the service recorded for that part id."""
    from filo_line.plc.modbus import decode_part_id, encode_part_id
    from tests.test_line_plc import COILS, UNIT, ModbusPlc, _none, _not, until

    register, registers = 90, 10  # the file's part_id_register, and ModbusIO's default length

    async def write_part_id(peer: ModbusPlc, part_id: str) -> None:
        await peer.server.async_setValues(UNIT, 16, register, encode_part_id(part_id, registers))

    async def read_part_id(peer: ModbusPlc) -> str:
        return decode_part_id(list(await peer.server.async_getValues(UNIT, 3, register, registers)))

    folder = tmp_path / "cam"
    parts = ["SN-100", "SN-101", "SN-102"]
    seen: list[tuple[str, bool, bool, bool]] = []
    log = tmp_path / "connector.log"

    async def main() -> int:
        peer = ModbusPlc(free_port())
        await peer.start()
        station = folder_station(folder, name="modbuscam", deadline_ms=1500,
                                 plc={"kind": "modbus", "host": "127.0.0.1", "port": peer.port, "unit": UNIT,
                                      "triggered": True, "coils": COILS, "part_id_register": register})
        proc = connector(line_file(tmp_path, serve.url, [station]), log)
        try:
            for i, part in enumerate(parts):
                await until(lambda: peer.get("trigger_ready"), "TriggerReady", 60 if i == 0 else 15)
                write_image(folder, f"frame-{i}.png", 700 + i)  # the camera's image, then the PLC's trigger
                await write_part_id(peer, part)
                await peer.set("trigger", True)
                await until(lambda: _not(peer.get("trigger_ready")), "TriggerReady to fall")
                await write_part_id(peer, "")  # so that the id read with the result is the one the connector wrote
                await until(lambda: peer.get("result_ready"), "ResultReady")
                seen.append((await read_part_id(peer), await peer.get("ok"), await peer.get("ng"), await peer.get("error")))
                await peer.set("trigger", False)
                await peer.set("ack", True)
                await until(lambda: _not(peer.get("result_ready")), "ResultReady to fall")
                await until(lambda: _none(peer, "ok", "ng", "error"), "OK, NG and Error cleared")
                await peer.set("ack", False)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 30)
            await peer.stop()
        return code

    try:
        code = asyncio.run(main())
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{log.read_text()[-3000:]}") from None
    assert code == 0, log.read_text()[-3000:]
    assert [s[0] for s in seen] == parts
    for part_id, ok, ng, error in seen:
        wait_until(lambda p=part_id: len(records(serve.url, p)) >= 1, 30, what=f"the record of {part_id}")
        (record,) = records(serve.url, part_id)
        assert record["source"] == "modbuscam"
        assert (ok, ng, error) == (not record["is_anomalous"], record["is_anomalous"], False)
    assert sorted(p.name for p in (folder / "done").iterdir()) == [f"frame-{i}.png" for i in range(3)]
