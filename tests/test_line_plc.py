"""The PLC handshake against real PLC stand-ins over loopback: an asyncua OPC UA server with the nodes of the line
configuration's example (ns=2;s=Cam1.*) and a pymodbus TCP server with coils and holding registers. A small "PLC
program" task plays the PLC's side of the handshake on each; the connector's side is PlcHandshake over OpcUaIO or
ModbusIO, as `filo line` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from filo_line.plc.base import PlcError
from filo_line.plc.handshake import PlcHandshake, SignalReport
from filo_line.plc.modbus import ModbusIO, contiguous_runs, decode_part_id, encode_part_id
from filo_line.plc.opcua import OpcUaIO

NODE_NAMES = {"trigger_ready": "TriggerReady", "trigger": "Trigger", "part_id": "PartId",
              "result_ready": "ResultReady", "ok": "ResultOK", "ng": "ResultNG", "error": "Error",
              "ack": "ResultAck"}
OPCUA_NODES = {key: f"ns=2;s=Cam1.{name}" for key, name in NODE_NAMES.items()}
COILS = {"trigger_ready": 0, "trigger": 1, "result_ready": 2, "ok": 3, "ng": 4, "error": 5, "ack": 6}
UNIT = 1
PART_ID_REGISTER = 100
PART_ID_REGISTERS = 8
PROTOCOLS = ["opcua", "modbus"]
SCENARIO_TIMEOUT_S = 60  # a hung scenario fails instead of hanging the suite; no assertion is about time

logging.getLogger("asyncua").setLevel(logging.ERROR)
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 15.0) -> None:
    """The PLC program's wait: polls `check` like a PLC scan does."""
    async def loop() -> None:
        while not await check():
            await asyncio.sleep(0.002)

    try:
        await asyncio.wait_for(loop(), timeout_s)
    except asyncio.TimeoutError:
        raise AssertionError(f"the PLC waited in vain for {what}") from None


# --- the PLC stand-ins: the same small interface over both protocols


class OpcUaPlc:
    """An OPC UA server with the station's nodes, as a PLC exposes them."""

    def __init__(self, port: int) -> None:
        self.endpoint = f"opc.tcp://127.0.0.1:{port}"
        self.server: Any = None
        self.running = False
        self.nodes: dict[str, Any] = {}
        self.write_requests: list[list[str]] = []  # the node names of each client Write request

    async def start(self) -> None:
        """Builds the server the first time; after stop() starts it again (a restart: see reset)."""
        if self.server is not None:
            if not self.running:
                await self.server.start()
                self.running = True
            return
        await self.build()

    async def build(self) -> None:
        from asyncua import Server, ua
        from asyncua.common.callback import CallbackType

        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        assert await server.register_namespace("urn:filo:test-plc") == 2
        cam = await server.nodes.objects.add_object(ua.NodeId("Cam1", 2), "Cam1")
        for key, name in NODE_NAMES.items():
            initial = "" if key == "part_id" else False
            node = await cam.add_variable(ua.NodeId(f"Cam1.{name}", 2), name, initial)
            await node.set_writable()
            self.nodes[key] = node
        names = {node.nodeid: key for key, node in self.nodes.items()}

        def on_write(event: Any, _dispatcher: Any) -> None:
            if event.is_external:
                self.write_requests.append([names.get(w.NodeId, str(w.NodeId)) for w in event.request_params.NodesToWrite])

        server.subscribe_server_callback(CallbackType.PreWrite, on_write)
        await server.start()
        self.server = server
        self.running = True

    async def stop(self) -> None:
        """Stops serving and forgets every value, as a PLC that is switched off."""
        if self.server is not None and self.running:
            await self.server.stop()
            self.running = False
            await self.reset()

    async def reset(self) -> None:
        for key, node in self.nodes.items():
            await node.write_value("" if key == "part_id" else False)
        self.write_requests.clear()

    async def get(self, signal: str) -> bool:
        return bool(await self.nodes[signal].read_value())

    async def set(self, signal: str, value: bool) -> None:
        await self.nodes[signal].write_value(value)

    async def part_id(self) -> str:
        return await self.nodes["part_id"].read_value()

    async def set_part_id(self, part_id: str) -> None:
        await self.nodes["part_id"].write_value(part_id)

    def io(self, nodes: dict[str, str] | None = None) -> OpcUaIO:
        return OpcUaIO(self.endpoint, nodes or OPCUA_NODES, timeout_s=1.0)


class ModbusPlc:
    """A Modbus TCP server with the station's coils and part id registers, as a PLC exposes them."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"127.0.0.1:{port}"
        self.server: Any = None
        self.requests: list[int] = []  # the function code of each request received

    async def start(self) -> None:
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import SimData, SimDevice
        from pymodbus.simulator.simdata import DataType

        device = SimDevice(id=UNIT, simdata=(
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],  # coils
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],  # discrete inputs
            [SimData(0, count=PART_ID_REGISTER + PART_ID_REGISTERS, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, count=1, values=0, datatype=DataType.REGISTERS)],  # input registers
        ))

        def trace(sending: bool, pdu: Any) -> Any:
            if not sending:
                self.requests.append(pdu.function_code)
            return pdu

        self.server = ModbusTcpServer(device, address=("127.0.0.1", self.port), trace_pdu=trace)
        await self.server.serve_forever(background=True)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown()
            self.server = None

    async def get(self, signal: str) -> bool:
        return bool((await self.server.async_getValues(UNIT, 1, COILS[signal], 1))[0])

    async def set(self, signal: str, value: bool) -> None:
        await self.server.async_setValues(UNIT, 5, COILS[signal], [value])

    async def registers(self) -> list[int]:
        return list(await self.server.async_getValues(UNIT, 3, PART_ID_REGISTER, PART_ID_REGISTERS))

    async def part_id(self) -> str:
        return decode_part_id(await self.registers())

    async def set_part_id(self, part_id: str) -> None:
        await self.server.async_setValues(UNIT, 16, PART_ID_REGISTER, encode_part_id(part_id, PART_ID_REGISTERS))

    def io(self, coils: dict[str, int] | None = None) -> ModbusIO:
        return ModbusIO("127.0.0.1", self.port, UNIT, coils or COILS, PART_ID_REGISTER, PART_ID_REGISTERS,
                        timeout_s=0.5)


Plc = OpcUaPlc | ModbusPlc


class Lab:
    """One event loop for the module's scenarios, and one OPC UA PLC on it: an asyncua server takes seconds to
    build its address space, so it is built once and its memory reset for each test (a Modbus PLC is made
    afresh, it costs nothing)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.opcua = OpcUaPlc(free_port())

    def run(self, scenario: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(scenario, SCENARIO_TIMEOUT_S))

    @contextlib.asynccontextmanager
    async def plc(self, protocol: str) -> AsyncIterator[Plc]:
        if protocol == "opcua":
            await self.opcua.start()
            await self.opcua.reset()
            yield self.opcua
            return
        peer = ModbusPlc(free_port())
        await peer.start()
        try:
            yield peer
        finally:
            await peer.stop()

    def close(self) -> None:
        self.loop.run_until_complete(self.opcua.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


@dataclass
class Seen:
    """What the PLC program read when ResultReady rose."""

    part_id: str
    ok: bool
    ng: bool
    error: bool
    trigger_ready: bool


async def plc_program(peer: Plc, parts: list[str], *, ack: bool = True, hold_trigger: bool = False) -> list[Seen]:
    """The PLC's side, part after part: wait for TriggerReady, put the part's serial in PartId, raise Trigger; wait
    for ResultReady, read the result, raise ResultAck; wait for ResultReady to fall and then OK, NG and Error to
    be cleared, drop ResultAck. PartId is blanked once the trigger is taken, so the id read with the result is the one the
    connector wrote."""
    seen: list[Seen] = []
    for part in parts:
        await until(lambda: peer.get("trigger_ready"), "TriggerReady")
        await peer.set_part_id(part)
        await peer.set("trigger", True)
        await until(lambda: _not(peer.get("trigger_ready")), "TriggerReady to fall after the trigger")
        await peer.set_part_id("")
        await until(lambda: peer.get("result_ready"), "ResultReady")
        seen.append(Seen(await peer.part_id(), await peer.get("ok"), await peer.get("ng"), await peer.get("error"),
                         await peer.get("trigger_ready")))
        if not hold_trigger:
            await peer.set("trigger", False)
        if ack:
            await peer.set("ack", True)
        await until(lambda: _not(peer.get("result_ready")), "ResultReady to fall")
        await until(lambda: _none(peer, "ok", "ng", "error"), "OK, NG and Error to be cleared")
        if ack:
            await peer.set("ack", False)
    return seen


async def _not(value: Awaitable[bool]) -> bool:
    return not await value


async def _none(peer: Plc, *signals: str) -> bool:
    return not any([await peer.get(s) for s in signals])


VERDICTS = {"P-1": (True, False), "P-2": (False, False), "P-3": (False, True), "P-4": (True, False),
            "P-5": (False, False)}  # part id -> (ok, error)


async def station(hs: PlcHandshake, peer: Plc, count: int, stop: asyncio.Event) -> list[tuple[str, SignalReport]]:
    """The connector's side as `filo line` runs a triggered station: ready, trigger, inspect, result, again. A
    PLC that goes away is waited for. The inspection lasts until the PLC program has blanked PartId, so that the
    id the PLC reads with the result is the one the connector wrote."""

    async def blank() -> bool:
        return await peer.part_id() == ""

    results: list[tuple[str, SignalReport]] = []
    while len(results) < count and not stop.is_set():
        try:
            await hs.set_trigger_ready(True)
            part = await hs.wait_trigger(stop)
            if not part:
                break
            await until(blank, "PartId blanked")
            ok, error = VERDICTS[part]
            results.append((part, await hs.signal(part, ok=ok, error=error)))
        except PlcError:
            await hs.wait_connected(15)
    return results


@contextlib.asynccontextmanager
async def connected(io: Any, ack_timeout_s: float = 2.0) -> AsyncIterator[tuple[PlcHandshake, list[str]]]:
    hs = PlcHandshake(io, ack_timeout_s=ack_timeout_s)
    states: list[str] = []
    hs.on_state(states.append)
    stop = asyncio.Event()
    keeper = asyncio.create_task(hs.keep_connected(stop))
    assert await hs.wait_connected(10), f"never connected: {states}"
    try:
        yield hs, states
    finally:
        stop.set()
        await keeper


# --- the handshake, both protocols


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_results_arrive_in_trigger_order_with_exactly_one_verdict(lab: Lab, protocol: str) -> None:
    parts = list(VERDICTS)

    async def scenario() -> tuple[list[Seen], list[tuple[str, SignalReport]], list[str]]:
        async with lab.plc(protocol) as peer, connected(peer.io()) as (hs, states):
            stop = asyncio.Event()
            seen, results = await asyncio.gather(plc_program(peer, parts), station(hs, peer, len(parts), stop))
        return seen, results, states

    seen, results, states = lab.run(scenario())
    assert [s.part_id for s in seen] == parts  # PartId written with each result, in trigger order
    assert [r[0] for r in results] == parts
    for s in seen:
        ok, error = VERDICTS[s.part_id]
        assert (s.ok, s.ng) == (ok, not ok)  # exactly one of OK / NG
        assert s.error == error  # Error only when asked
        assert not s.trigger_ready  # TriggerReady dropped from the trigger until the result
    assert all(r.acked and r.ack_ms is not None and r.write_ms >= 0 for _, r in results)
    assert states == ["connected", "closed"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_trigger_held_high_is_one_trigger(lab: Lab, protocol: str) -> None:
    async def scenario() -> tuple[list[str], int]:
        async with lab.plc(protocol) as peer:
            io = CountingIO(peer.io())
            async with connected(io) as (hs, _):
                stop = asyncio.Event()
                connector = asyncio.create_task(station(hs, peer, 5, stop))
                await plc_program(peer, ["P-1"], hold_trigger=True)  # Trigger stays high after its part
                await until(lambda: peer.get("trigger_ready"), "TriggerReady again")
                polled_from = io.reads["trigger"]
                await until(lambda: _true(io.reads["trigger"] >= polled_from + 30), "30 polls of the held Trigger")
                await peer.set("trigger", False)
                await until(lambda: _true(io.reads["trigger"] >= polled_from + 35), "polls of the dropped Trigger")
                await plc_program(peer, ["P-2"])  # a new rising edge is a new part
                stop.set()
                results = await connector
        return [part for part, _ in results], io.reads["trigger"] - polled_from

    parts, polls = lab.run(scenario())
    assert parts == ["P-1", "P-2"]
    assert polls >= 35


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_missing_ack_is_reported_and_the_outputs_are_cleared(lab: Lab, protocol: str) -> None:
    async def scenario() -> tuple[list[Seen], list[tuple[str, SignalReport]], dict[str, bool]]:
        async with lab.plc(protocol) as peer, connected(peer.io(), ack_timeout_s=0.3) as (hs, _):
            stop = asyncio.Event()
            seen, results = await asyncio.gather(plc_program(peer, ["P-2", "P-3"], ack=False), station(hs, peer, 2, stop))
            outputs = {s: await peer.get(s) for s in ("result_ready", "ok", "ng", "error")}
        return seen, results, outputs

    seen, results, outputs = lab.run(scenario())
    assert [s.part_id for s in seen] == ["P-2", "P-3"]
    assert [(r.acked, r.ack_ms) for _, r in results] == [(False, None), (False, None)]
    assert outputs == {"result_ready": False, "ok": False, "ng": False, "error": False}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_ack_that_never_falls_is_not_taken_for_the_next_part(lab: Lab, protocol: str) -> None:
    async def scenario() -> list[SignalReport]:
        async with lab.plc(protocol) as peer, connected(peer.io(), ack_timeout_s=0.3) as (hs, _):
            await peer.set("ack", True)  # left high by the PLC's program
            first = await hs.signal("P-1", ok=True, error=False)
            second = await hs.signal("P-2", ok=True, error=False)
            await peer.set("ack", False)
            async def ack_when_ready() -> None:
                await until(lambda: peer.get("result_ready"), "ResultReady")
                await peer.set("ack", True)
                await until(lambda: _not(peer.get("result_ready")), "ResultReady to fall")
                await peer.set("ack", False)
            third, _ = await asyncio.gather(hs.signal("P-4", ok=True, error=False), ack_when_ready())
        return [first, second, third]

    first, second, third = lab.run(scenario())
    assert (first.acked, first.ack_ms) == (False, None)
    assert (second.acked, second.ack_ms) == (False, None)
    assert third.acked and third.ack_ms is not None


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_restarted_plc_is_reconnected_and_signalling_resumes(lab: Lab, protocol: str) -> None:
    async def scenario() -> tuple[list[Seen], list[Seen], list[str], list[str]]:
        async with lab.plc(protocol) as peer, connected(peer.io()) as (hs, states):
            stop = asyncio.Event()
            connector = asyncio.create_task(station(hs, peer, 4, stop))
            before = await plc_program(peer, ["P-1", "P-2"])
            await until(lambda: peer.get("trigger_ready"), "the connector to be ready for the next part")
            await peer.stop()  # the PLC goes down, its memory with it
            await until(lambda: _true(hs.state == "reconnecting"), "the connector to notice")
            await peer.start()
            # the restarted PLC sees TriggerReady only because the reconnect writes it again: the station raised
            # it before the restart and is still waiting for its part
            after = await plc_program(peer, ["P-3", "P-4"])
            results = await connector
            states_seen = states.copy()
        return before, after, [p for p, _ in results], states_seen

    before, after, parts, states = lab.run(scenario())
    assert [s.part_id for s in before + after] == ["P-1", "P-2", "P-3", "P-4"]
    assert parts == ["P-1", "P-2", "P-3", "P-4"]
    assert states == ["connected", "reconnecting", "connected"]
    for s in before + after:
        ok, error = VERDICTS[s.part_id]
        assert (s.ok, s.ng, s.error) == (ok, not ok, error)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_handshake_refuses_to_signal_while_disconnected(lab: Lab, protocol: str) -> None:
    async def scenario() -> tuple[str, str]:
        async with lab.plc(protocol) as peer:
            io = peer.io()
            hs = PlcHandshake(io)
            with pytest.raises(PlcError) as refused:
                await hs.signal("P-1", ok=True, error=False)
        return hs.state, str(refused.value)

    state, message = lab.run(scenario())
    assert state == "closed"
    assert "not connected" in message


# --- check(): what `filo line --check` prints or refuses with


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_check_reads_every_signal_and_names_the_endpoint(lab: Lab, protocol: str) -> None:
    async def scenario() -> tuple[str, str]:
        async with lab.plc(protocol) as peer:
            return await peer.io().check(), peer.endpoint

    line, endpoint = lab.run(scenario())
    assert endpoint in line
    assert ("8 nodes" if protocol == "opcua" else "7 coils") in line


def test_check_names_a_missing_opcua_node(lab: Lab) -> None:
    async def scenario() -> str:
        async with lab.plc("opcua") as peer:
            io = peer.io({**OPCUA_NODES, "ack": "ns=2;s=Cam1.NoSuchAck"})
            with pytest.raises(PlcError) as refused:
                await io.check()
            return str(refused.value)

    message = lab.run(scenario())
    assert "ack (ns=2;s=Cam1.NoSuchAck)" in message
    assert "BadNodeIdUnknown" in message
    assert "trigger" not in message.replace("opc.tcp", "")  # only the missing one is named


def test_check_names_a_refused_modbus_coil(lab: Lab) -> None:
    async def scenario() -> str:
        async with lab.plc("modbus") as peer:
            io = peer.io({**COILS, "ack": 40})
            with pytest.raises(PlcError) as refused:
                await io.check()
            return str(refused.value)

    message = lab.run(scenario())
    assert "coil 40 (ack)" in message
    assert "illegal data address" in message


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_check_names_an_unreachable_endpoint(lab: Lab, protocol: str) -> None:
    port = free_port()  # nothing listens there
    io: Any = (OpcUaIO(f"opc.tcp://127.0.0.1:{port}", OPCUA_NODES, timeout_s=1.0) if protocol == "opcua"
               else ModbusIO("127.0.0.1", port, UNIT, COILS, PART_ID_REGISTER, timeout_s=0.5))

    async def scenario() -> str:
        with pytest.raises(PlcError) as refused:
            await io.check()
        return str(refused.value)

    message = lab.run(scenario())
    assert f"127.0.0.1:{port}" in message
    assert "cannot connect" in message


# --- how each protocol carries the signals


def test_opcua_writes_several_signals_in_one_request_and_result_ready_last(lab: Lab) -> None:
    async def scenario() -> list[list[str]]:
        async with lab.plc("opcua") as peer, connected(peer.io(), ack_timeout_s=0.2) as (hs, _):
            peer.write_requests.clear()
            await hs.signal("P-1", ok=False, error=True)
            return list(peer.write_requests)

    requests = lab.run(scenario())
    assert requests == [["part_id"], ["ok", "ng", "error"], ["result_ready"], ["result_ready"],
                        ["ok", "ng", "error"]]


def test_modbus_writes_contiguous_coils_in_one_request_and_others_one_each(lab: Lab) -> None:
    spread = {**COILS, "ok": 3, "ng": 8, "error": 12}

    async def scenario() -> tuple[list[int], list[int], list[int]]:
        async with lab.plc("modbus") as peer:
            contiguous, scattered = peer.io(), peer.io(spread)
            await contiguous.connect()
            await scattered.connect()
            peer.requests.clear()
            await contiguous.write_bools({"ok": True, "ng": False, "error": True})
            one_request = list(peer.requests)
            peer.requests.clear()
            await scattered.write_bools({"ok": True, "ng": False, "error": True})
            one_each = list(peer.requests)
            coils = [await peer.get(s) for s in ("ok", "ng", "error")]
            await contiguous.close()
            await scattered.close()
            return one_request, one_each, coils

    one_request, one_each, coils = lab.run(scenario())
    assert one_request == [15]  # Write Multiple Coils
    assert one_each == [5, 5, 5]  # Write Single Coil
    assert coils == [True, False, True]


def test_modbus_part_id_is_ascii_two_chars_per_register_big_endian_nul_padded(lab: Lab) -> None:
    async def scenario() -> tuple[list[int], str]:
        async with lab.plc("modbus") as peer:
            io = peer.io()
            await io.connect()
            await io.write_part_id("SN-0042A")
            written = await peer.registers()
            await peer.set_part_id("  B7 ")
            read = await io.read_part_id()
            await io.close()
            return written, read

    written, read = lab.run(scenario())
    assert written == [0x534E, 0x2D30, 0x3034, 0x3241, 0, 0, 0, 0]
    assert read == "B7"
    assert encode_part_id("ABC", 3) == [0x4142, 0x4300, 0]
    assert encode_part_id("ABCDEFGH", 2) == [0x4142, 0x4344]  # cut to what the registers hold
    assert decode_part_id([0x4142, 0x0043]) == "AB"  # the first NUL ends it
    assert contiguous_runs({3: True, 4: False, 5: True, 9: False}) == [(3, [True, False, True]), (9, [False])]


def test_the_transports_refuse_unknown_signal_names() -> None:
    with pytest.raises(ValueError, match="triger"):
        OpcUaIO("opc.tcp://127.0.0.1:4840", {"triger": "ns=2;s=Cam1.Trigger"})
    with pytest.raises(ValueError, match="not an OPC UA node id"):
        OpcUaIO("opc.tcp://127.0.0.1:4840", {"trigger": "Cam1.Trigger"})
    with pytest.raises(ValueError, match="ackk"):
        ModbusIO("127.0.0.1", 502, 1, {"ackk": 6}, 0)


# --- helpers


class CountingIO:
    """A PlcIO that counts the reads of each signal, so that a test can wait for polls instead of for time."""

    def __init__(self, io: Any) -> None:
        self._io = io
        self.reads: dict[str, int] = {"trigger": 0, "ack": 0}

    async def read_bool(self, signal: str) -> bool:
        value = await self._io.read_bool(signal)
        self.reads[signal] += 1
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._io, name)


async def _true(value: bool) -> bool:
    return value
