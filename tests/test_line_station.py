"""One station against the real service (demo profile, over loopback), a real mosquitto and real files: every
part inspected once and signalled exactly once by its deadline, in trigger order, whatever fails.

The PLC is `FakePlc` (tests/line_fakes.py) under the real handshake (PlcHandshake), recording every write; assertions are
on mechanisms and counts (which signals, how many, in which order, before the deadline the part carried), never
on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator

import pytest

from filo_line.publish.folder import FolderPublisher
from filo_line.publish.mqtt import MqttPublisher
from filo_line.replay import Replayer
from filo_line.spool import Spool
from tests.line_fakes import (
    KEY,
    READER_KEY,
    Broker,
    Subscriber,
    deadlines_met,
    make_rig,
    records,
    run,
    wait_for,
    write_image,
)
from tests.service_fixtures import ServerThread, demo_settings, free_port, png_bytes, wait_ready


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[str]:
    from service.api.app import create_app
    from service.backends.embedded import EmbeddedBackend

    settings = demo_settings(state_dir=tmp_path_factory.mktemp("line-service"), api_keys=[f"line:{KEY}"],
                             reader_keys=[f"qa:{READER_KEY}"])
    with ServerThread(create_app(settings, EmbeddedBackend(settings))) as srv:
        wait_ready(srv.url)
        yield srv.url


@pytest.fixture
def broker(tmp_path) -> Iterator[Broker]:
    b = Broker(tmp_path).start()
    yield b
    b.stop()


def test_an_untriggered_folder_station_inspects_each_file_once_and_signals_it_once(tmp_path, service, broker):
    sorted_dir = tmp_path / "sorted"
    sub = Subscriber(broker, "filo/line1/cam1")
    rig = make_rig(tmp_path, service, publishers=[MqttPublisher(broker.url, "filo/line1/cam1"),
                                                  FolderPublisher(sorted_dir)])
    names = [f"bolt-{i:03d}" for i in range(5)]
    written_at: dict[str, float] = {}

    async def scenario() -> None:
        import time

        for i, name in enumerate(names):
            write_image(rig.folder, f"{name}.png", seed=100 + i)
            written_at[name] = time.time()
        await wait_for(lambda: len(rig.plc.results) == len(names) and len(sub.messages) == len(names), 60,
                       "five results and five messages")
        await asyncio.sleep(0.3)  # nothing more comes

    try:
        run(rig, scenario)
    finally:
        sub.close()
    assert [r.part_id for r in rig.plc.results] == names  # one signal each, in trigger order
    deadlines_met(rig, written_at)
    assert len(sub.messages) == len(names)
    by_part = {m["part_id"]: m for m in sub.messages}
    for name, result in zip(names, rig.plc.results):
        (record,) = records(service, name)  # exactly one record, the station's
        assert record["source"] == "cam1" and record["part_id"] == name
        message = by_part[name]
        assert message["request_id"] == record["id"]
        assert message["verdict"] == ("ng" if record["is_anomalous"] else "ok")  # the service's verdict
        assert (result.ok, result.ng, result.error) == (not record["is_anomalous"], record["is_anomalous"], False)
        assert message["score"] == pytest.approx(record["score"]) and message["threshold"] == record["threshold"]
        assert message["top_type"] == record["top_types"][0]["description"]
        assert message["late"] is False and message["signalled"] == {"ok": result.ok, "ng": result.ng,
                                                                    "error": False}
        assert message["station"] == "cam1" and message["latency_ms"] > 0 and message["boxes"] == record["boxes"]
        assert message["triggered_at"].endswith("Z") and message["signalled_at"] >= message["triggered_at"]
    assert sorted(p.name for p in (rig.folder / "done").iterdir()) == [f"{n}.png" for n in names]
    assert not list((rig.folder / "processing").iterdir()) and not list((rig.folder / "failed").iterdir())
    copied = sorted(p.name for v in ("ok", "ng") for p in (sorted_dir / v).iterdir())
    assert copied == [f"{n}.png" for n in names]
    assert sum(rig.sample("filo_line_parts_total", verdict=v) for v in ("ok", "ng")) == len(names)
    assert rig.spool.depth == 0


def test_a_corrupt_image_fails_its_own_part_with_an_error_signal_and_the_station_goes_on(tmp_path, service):
    rig = make_rig(tmp_path, service)
    good = png_bytes(seed=7)

    async def scenario() -> None:
        write_image(rig.folder, "p1.png", 1)
        await wait_for(lambda: len(rig.plc.results) == 1, 30, "the first result")
        write_image(rig.folder, "p2.png", 0, data=good[: len(good) // 2])  # half-written, then closed
        write_image(rig.folder, "p3.png", 0, data=b"not an image at all")
        write_image(rig.folder, "p4.png", 4)
        await wait_for(lambda: len(rig.plc.results) == 4, 30, "four results")

    run(rig, scenario)
    results = {r.part_id: r for r in rig.plc.results}
    assert [r.part_id for r in rig.plc.results] == ["p1", "p2", "p3", "p4"]
    for bad in ("p2", "p3"):
        assert (results[bad].ng, results[bad].ok, results[bad].error) == (True, False, True)  # fail-safe NG + Error
        assert (rig.folder / "failed" / f"{bad}.png").exists()
        reason = (rig.folder / "failed" / f"{bad}.png.reason.txt").read_text()
        assert "broken PNG" in reason or "not an image" in reason
        assert records(service, bad) == []
    for fine in ("p1", "p4"):
        assert results[fine].error is False and len(records(service, fine)) == 1
    assert rig.sample("filo_line_parts_total", verdict="error") == 2
    assert rig.spool.depth == 0  # a broken image is never spooled: no service will ever take it


def test_without_the_service_every_part_gets_the_fail_safe_by_its_deadline_and_is_recorded_once_later(
        tmp_path, service, broker):
    """The service stopped (nothing listens): NG + Error by the deadline, the images spooled; when the service
    is back the replayer sends them with their request ids: one record each, a late message each, and the PLC is
    not told again."""
    import time

    sub = Subscriber(broker, "t/cam1")
    away = f"http://127.0.0.1:{free_port()}"
    rig = make_rig(tmp_path, away, deadline_ms=800, publishers=[MqttPublisher(broker.url, "t/cam1")])
    written_at: dict[str, float] = {}

    async def scenario() -> None:
        for i in range(3):
            write_image(rig.folder, f"away-{i}.png", 30 + i)
            written_at[f"away-{i}"] = time.time()
        await wait_for(lambda: len(rig.plc.results) == 3 and rig.spool.depth == 3, 30, "three fail-safes spooled")

    run(rig, scenario)
    assert [(r.part_id, r.ok, r.ng, r.error) for r in rig.plc.results] == [
        (f"away-{i}", False, True, True) for i in range(3)]
    deadlines_met(rig, written_at)
    assert rig.sample("filo_line_parts_total", verdict="timeout") == 3
    assert rig.sample("filo_line_service_errors_total", reason="unreachable") >= 3
    assert sorted(p.name for p in (rig.folder / "done").iterdir()) == [f"away-{i}.png" for i in range(3)]
    assert all(m["verdict"] == "timeout" and m["late"] is False for m in sub.messages)

    # the service is back: replay through a station of the same name that publishes to the same topic
    late_rig = make_rig(tmp_path / "later", service, publishers=[MqttPublisher(broker.url, "t/cam1")])
    late_rig.spool = Spool(tmp_path / "spool", 50 * 1024 * 1024)
    late_rig.spool.open()
    assert late_rig.spool.depth == 3

    async def replay() -> None:
        stop = asyncio.Event()
        late_rig.station.publishers[0].start()

        def late(meta, outcome, image) -> None:
            late_rig.station.report_late(part_id=meta.part_id, request_id=meta.request_id, outcome=outcome,
                                         triggered_at=meta.triggered_at, signalled_at=meta.signalled_at,
                                         signalled=None, image_name=meta.image_name, image=image)

        task = asyncio.create_task(Replayer(late_rig.spool, late_rig.client, late).run(stop))
        await wait_for(lambda: late_rig.spool.depth == 0 and len(sub.messages) == 6, 60, "the spool replayed")
        stop.set()
        await task
        await asyncio.to_thread(late_rig.station.publishers[0].stop, 5.0)
        await late_rig.client.close()

    try:
        asyncio.run(replay())
    finally:
        sub.close()
    late_messages = [m for m in sub.messages if m["late"]]
    assert sorted(m["part_id"] for m in late_messages) == [f"away-{i}" for i in range(3)]
    for m in late_messages:
        (record,) = records(service, m["part_id"])
        assert record["id"] == m["request_id"] and m["verdict"] == ("ng" if record["is_anomalous"] else "ok")
    assert len(rig.plc.results) == 3  # never signalled again


class _Always503(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"error": {"code": "not_ready", "message": "the model is loading"}}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_service_answering_503_gets_retries_then_the_fail_safe_ok_with_error(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Always503)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    rig = make_rig(tmp_path, f"http://127.0.0.1:{server.server_port}", deadline_ms=800, on_timeout="ok")

    async def scenario() -> None:
        write_image(rig.folder, "x1.png", 1)
        write_image(rig.folder, "x2.png", 2)
        await wait_for(lambda: len(rig.plc.results) == 2 and rig.spool.depth == 2, 30, "two fail-safes")

    try:
        run(rig, scenario)
    finally:
        server.shutdown()
        server.server_close()
    assert [(r.part_id, r.ok, r.ng, r.error) for r in rig.plc.results] == [
        ("x1", True, False, True), ("x2", True, False, True)]  # on_timeout: ok -> OK + Error
    assert rig.sample("filo_line_service_errors_total", reason="unavailable") >= 4  # tried again while time was left
    assert rig.sample("filo_line_deadline_misses_total") == 0


def test_a_broker_that_is_away_never_delays_a_signal_and_gets_the_messages_when_it_is_back(tmp_path, service):
    import time

    broker = Broker(tmp_path, persistent=True).start()  # the subscriber's session outlives the restart
    sub = Subscriber(broker, "t/away", session="line-test-away")
    rig = make_rig(tmp_path, service, publishers=[MqttPublisher(broker.url, "t/away")])
    written_at: dict[str, float] = {}
    publisher = rig.station.publishers[0]

    async def scenario() -> None:
        await wait_for(lambda: publisher.connected, 10, "the broker connected")
        broker.stop()
        await wait_for(lambda: not publisher.connected, 10, "the broker gone")
        for i in range(4):
            write_image(rig.folder, f"b{i}.png", 60 + i)
            written_at[f"b{i}"] = time.time()
        await wait_for(lambda: len(rig.plc.results) == 4, 30, "four results")
        assert sub.messages == []
        broker.start()  # what waited while the broker was away arrives once it is back
        await wait_for(lambda: len({m["part_id"] for m in sub.messages}) == 4, 30, "the four buffered messages")

    try:
        run(rig, scenario)
    finally:
        sub.close()
        broker.stop()
    assert sorted({m["part_id"] for m in sub.messages}) == [f"b{i}" for i in range(4)]
    assert [r.part_id for r in rig.plc.results] == [f"b{i}" for i in range(4)]
    assert all(not r.error for r in rig.plc.results)  # verdicts, in time, with the broker away
    deadlines_met(rig, written_at)
    assert publisher.dropped == 0


def test_a_triggered_station_reads_the_part_id_and_raises_trigger_ready_again(tmp_path, service):
    rig = make_rig(tmp_path, service, triggered=True)

    async def scenario() -> None:
        plc = rig.plc
        await wait_for(lambda: plc.values["trigger_ready"], 10, "TriggerReady")
        write_image(rig.folder, "cam-frame-a.png", 11)  # the image first, then the trigger
        await asyncio.sleep(0.1)
        plc.trigger("SN-0001")
        await wait_for(lambda: len(plc.results) == 1 and plc.values["trigger_ready"], 30, "the first part")
        plc.trigger("SN-0002")  # the trigger first, the image later
        await asyncio.sleep(0.1)
        write_image(rig.folder, "cam-frame-b.png", 12)
        await wait_for(lambda: len(plc.results) == 2 and plc.values["trigger_ready"], 30, "the second part")

    run(rig, scenario)
    assert [r.part_id for r in rig.plc.results] == ["SN-0001", "SN-0002"]
    assert all(not r.error for r in rig.plc.results)
    assert [len(records(service, p)) for p in ("SN-0001", "SN-0002")] == [1, 1]
    levels = [w for i, w in enumerate(rig.plc.trigger_ready_writes) if i == 0 or w != rig.plc.trigger_ready_writes[i - 1]]
    assert levels[levels.index(True):][:5] == [True, False, True, False, True]  # up, taken, up, taken, up


def test_a_plc_that_comes_back_before_the_deadline_gets_the_fail_safe_and_one_that_does_not_is_a_miss(
        tmp_path, service):
    rig = make_rig(tmp_path, service, deadline_ms=1500)

    async def scenario() -> None:
        plc = rig.plc
        await wait_for(lambda: plc.connected, 10, "the PLC connected")
        plc.down = True
        write_image(rig.folder, "during.png", 21)  # triggered while the PLC is away; back in time
        await asyncio.sleep(0.4)
        plc.down = False
        await wait_for(lambda: len(plc.results) == 1, 30, "the fail-safe once the PLC is back")
        # the handshake finished (Ack dropped) before the PLC goes away again: a PLC lost while it waits for Ack
        # makes PlcHandshake.signal raise, and the station cannot tell that from a result never written
        await wait_for(lambda: not plc.values["result_ready"] and not plc.values["ack"], 30, "the handshake done")
        plc.down = True
        write_image(rig.folder, "missed.png", 22)  # away past its deadline
        await wait_for(lambda: rig.sample("filo_line_deadline_misses_total") == 1, 30, "the miss counted")
        plc.down = False
        await wait_for(lambda: rig.station.handshake.connected, 30, "the handshake reconnected")
        write_image(rig.folder, "after.png", 23)
        await wait_for(lambda: len(plc.results) == 2, 30, "the next part signalled normally")

    run(rig, scenario)
    during, after = rig.plc.results
    assert (during.part_id, during.ng, during.error) == ("during", True, True)
    assert (after.part_id, after.error) == ("after", False)
    assert rig.sample("filo_line_deadline_misses_total") == 1
    assert [len(records(service, p)) for p in ("during", "missed", "after")] == [1, 1, 1]  # all inspected


def test_the_line_benchmark_counts_every_part_of_a_rate(service):
    """filo_lab/bench/line.py, one short rate: every triggered part has its latency, none is missed."""
    from filo_lab.bench.line import run_rate, table

    result = asyncio.run(run_rate(service, KEY, "bottle", "folder", "fake", rate=5, seconds=1,
                                  image=png_bytes(seed=5), deadline_ms=1500, warmup=1))
    assert (result.parts, result.missed) == (5, 0)
    assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms
    assert "| folder | fake | 5 | 5 |" in table("folder", "fake", 1500, [result])


def test_a_plc_lost_while_acknowledging_is_told_the_part_once() -> None:
    """Once ResultReady stands, the part is signalled: a PLC lost before its ResultAck is reported (not acked), not
    raised, so the station never signals that part a second time when the PLC is back."""
    import asyncio

    from tests.line_fakes import FakePlc, make_handshake

    async def scenario() -> None:
        plc = FakePlc(ack_delay_s=10.0)  # the acknowledgement would come late: the PLC goes away first
        hs = make_handshake(plc)
        await plc.connect()
        hs._set_state("connected")  # by hand: no reconnect loop in this test

        async def drop() -> None:
            while not plc.results:
                await asyncio.sleep(0.01)
            plc.down = True

        dropper = asyncio.get_running_loop().create_task(drop())
        report = await hs.signal("P-1", ok=False, error=False)
        await dropper
        assert not report.acked and report.ack_ms is None
        assert [(r.part_id, r.ok, r.ng) for r in plc.results] == [("P-1", False, True)]  # told once, NG

    asyncio.run(scenario())
