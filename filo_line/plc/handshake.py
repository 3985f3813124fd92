"""The handshake with the PLC, the same over every transport (`PlcIO`): when a part may come, which part came, and
each part's result, in trigger order, acknowledged by the PLC.

Signals (the connector's side; docs/line-plc.md has the PLC programmer's view and the timing diagram):

    written: TriggerReady, ResultReady, ResultOK, ResultNG, Error, PartId (with each result)
    read:    Trigger, ResultAck, PartId (the PLC's serial, on Trigger's rising edge)

The state machine, one per station. The trigger side and the result side are independent; a part's result may be
signalled while the PLC already waits for TriggerReady again.

    Trigger side (triggered stations)
    state           on                                      do                                     next
    NOT_READY       set_trigger_ready(True)                 read Trigger (the edge's baseline),    READY
                                                            then TriggerReady := 1
    READY           Trigger 0 -> 1 (seen by polling)        read PartId, TriggerReady := 0         NOT_READY
    READY           Trigger held at 1                       nothing: one level is one trigger      READY
    READY           set_trigger_ready(False)                TriggerReady := 0                      NOT_READY

    Result side (every station with a PLC)
    state           on                                      do                                     next
    IDLE            signal(part_id, ok, error)              PartId, OK/NG (one), Error := ...      RESULT_WRITTEN
    RESULT_WRITTEN  (at once)                               ResultReady := 1 (last)                WAIT_ACK
    WAIT_ACK        ResultAck 0 -> 1, or ack_timeout_s      ResultReady := 0, then OK/NG/Error:=0  WAIT_ACK_LOW
    WAIT_ACK_LOW    ResultAck = 0, or ack_timeout_s         report (acked or not)                  IDLE
    WAIT_ACK        the transport fails                     raise PlcError                         IDLE
    WAIT_ACK_LOW    the transport fails                     report (the PLC has the result)        IDLE

    Connection (keep_connected)
    state           on                                      do                                     next
    closed          keep_connected() starts                 connect                                connected
    connected       a read or write fails on the transport  log once, wake keep_connected          reconnecting
    reconnecting    connect succeeds                        outputs to 0, TriggerReady restored    connected
    reconnecting    connect fails                           wait 0.2 s, doubling up to 5 s         reconnecting
    any             the stop event is set                   close                                  closed

Why these rules:
- ResultReady rises last, so the PLC never sees it with the previous part's values; it falls first, so the PLC
  never sees it with cleared ones.
- A missing or late ResultAck never blocks the line for longer than ack_timeout_s twice; it is reported
  (`SignalReport.acked` False), not raised, since the result itself has been signalled. Once ResultReady stands,
  the part is signalled: a connection lost while waiting for the acknowledgement or while clearing is left to the
  reconnect, which clears the outputs, so that the part is never signalled twice.
- If ResultAck is still 1 from the previous part when a new result is written, that level is not taken as this
  part's acknowledgement: the PLC must drop it and raise it again.
- The last Trigger level is kept across reconnects, so that a Trigger held high through a network blip is not a
  second part.
- After a reconnect (a restarted PLC has lost its memory) the outputs are written to a known state: ResultReady,
  OK, NG and Error 0, TriggerReady as the station last asked.
- Results are signalled one at a time, in the order `signal` is called (asyncio's lock is first come, first
  served), and every read or write goes through one lock so that the transport sees one request at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from filo_line.plc.base import PlcError, PlcIO

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_S = 0.01  # how often Trigger and ResultAck are read while waited for
PROBE_S = 1.0  # an idle connection is probed this often, so that its state is true while nothing happens
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0


@dataclass
class SignalReport:
    """How one result went: `acked` is True when the PLC raised ResultAck for it within ack_timeout_s; `write_ms`
    is from the first write to ResultReady = 1 written; `ack_ms` from then to ResultAck seen (None when it never
    came)."""

    acked: bool
    write_ms: float
    ack_ms: float | None


class PlcHandshake:
    """The handshake's state machine (see the module's docstring) over one `PlcIO`."""

    def __init__(self, io: PlcIO, ack_timeout_s: float = 2.0) -> None:
        self.io = io
        self.ack_timeout_s = ack_timeout_s
        self._state = "closed"
        self._callbacks: list[Callable[[str], None]] = []
        self._io_lock = asyncio.Lock()
        self._result_lock = asyncio.Lock()
        self._lost = asyncio.Event()
        self._connected_event = asyncio.Event()
        self._want_trigger_ready = False
        self._last_trigger = False
        self._last_ok_io = 0.0

    # --- state

    @property
    def connected(self) -> bool:
        return self._state == "connected" and self.io.connected

    @property
    def state(self) -> str:
        """'connected', 'reconnecting' or 'closed'."""
        return self._state

    def on_state(self, callback: Callable[[str], None]) -> None:
        """Calls `callback(state)` on every change of state (the metrics' PLC connection gauge)."""
        self._callbacks.append(callback)

    async def wait_connected(self, timeout_s: float | None = None) -> bool:
        """True once connected (at once if it is), False when `timeout_s` passes first."""
        if self.connected:
            return True
        try:
            await asyncio.wait_for(self._connected_event.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return self.connected

    def _set_state(self, state: str, reason: str = "") -> None:
        if state == self._state:
            return
        self._state = state
        if state == "connected":
            self._connected_event.set()
        else:
            self._connected_event.clear()
        log.info("PLC %s: %s%s", _endpoint(self.io), state, f" ({reason})" if reason else "")
        for callback in self._callbacks:
            try:
                callback(state)
            except Exception:
                log.exception("PLC state callback failed")

    # --- connection

    async def keep_connected(self, stop: asyncio.Event) -> None:
        """Connects, and reconnects whenever the connection is lost, with backoff (0.2 s doubling to 5 s), until
        `stop` is set; then closes. Run it as a task beside the station."""
        delay = BACKOFF_FIRST_S
        try:
            while not stop.is_set():
                if self.connected:
                    await _first_of(stop.wait(), self._lost.wait(), timeout_s=PROBE_S)
                    if not stop.is_set() and not self._lost.is_set() and self.connected:
                        await self._probe()
                    continue
                if self._state == "connected":  # the transport noticed the loss by itself
                    self._set_state("reconnecting", "connection lost")
                self._lost.clear()
                try:
                    async with self._io_lock:
                        await self.io.connect()
                        await self._restore_outputs()
                        self._last_ok_io = time.monotonic()
                except PlcError as exc:
                    self._set_state("reconnecting", str(exc))
                    await _first_of(stop.wait(), timeout_s=delay)
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    continue
                delay = BACKOFF_FIRST_S
                self._set_state("connected")
        finally:
            async with self._io_lock:
                with contextlib.suppress(Exception):
                    await self.io.close()
            self._set_state("closed")

    async def _restore_outputs(self) -> None:
        await self.io.write_bools(self._outputs({"result_ready": False, "ok": False, "ng": False, "error": False,
                                                 "trigger_ready": self._want_trigger_ready}))

    def _outputs(self, values: dict[str, bool]) -> dict[str, bool]:
        """The subset of `values` the transport has a place for (an untriggered station may have no TriggerReady)."""
        names = _configured(self.io)
        return values if names is None else {k: v for k, v in values.items() if k in names}

    async def _probe(self) -> None:
        if time.monotonic() - self._last_ok_io < PROBE_S:
            return
        with contextlib.suppress(PlcError):
            await self._read_bool("ack" if _has(self.io, "ack") else "trigger")

    # --- trigger side

    async def set_trigger_ready(self, ready: bool) -> None:
        """Raises or drops TriggerReady; the level is remembered and restored after a reconnect. When it rises,
        Trigger is read first: that level is what the next rising edge is measured from, so a Trigger the PLC
        dropped and raised again while no one polled (during the result) is still one new part, and a Trigger
        still held high from the last part is none."""
        if ready and not self._want_trigger_ready and _has(self.io, "trigger"):
            self._last_trigger = await self._read_bool("trigger")
        self._want_trigger_ready = ready
        await self._write({"trigger_ready": ready})

    async def wait_trigger(self, stop: asyncio.Event | None = None) -> str:
        """Waits for Trigger's rising edge, then reads PartId, drops TriggerReady and returns the part id.
        Returns "" when `stop` is set first; raises PlcError when the connection fails meanwhile."""
        while stop is None or not stop.is_set():
            level = await self._read_bool("trigger")
            rising = level and not self._last_trigger
            self._last_trigger = level
            if rising:
                part_id = await self._io("read PartId", self.io.read_part_id())
                self._want_trigger_ready = False
                await self._write({"trigger_ready": False})
                return part_id
            await _first_of(*([stop.wait()] if stop is not None else []), timeout_s=POLL_S)
        return ""

    # --- result side

    async def signal(self, part_id: str, ok: bool, error: bool) -> SignalReport:
        """Signals one part's result and completes the acknowledgement (see the state table). A PLC that does not
        acknowledge in time, or is lost once ResultReady stands, is reported (`acked` False), not raised; a
        transport failure before ResultReady is written raises PlcError (the part was not signalled)."""
        async with self._result_lock:
            stale_ack = await self._read_bool("ack")
            start = time.monotonic()
            await self._io("write PartId", self.io.write_part_id(part_id))
            await self._write({"ok": ok, "ng": not ok, "error": error})
            await self._write({"result_ready": True})
            ready_at = time.monotonic()
            # From here the part is signalled: ResultReady with its result stands at the PLC. A connection lost
            # now is reported (not acknowledged), never raised, so the station never signals the part a second
            # time; the reconnect clears the outputs.
            try:
                ack_ms = await self._wait_ack(stale_ack)
            except PlcError:
                log.warning("PLC %s: lost while waiting for ResultAck of %r", _endpoint(self.io), part_id)
                ack_ms = None
            report = SignalReport(acked=ack_ms is not None, write_ms=(ready_at - start) * 1000, ack_ms=ack_ms)
            try:
                await self._write({"result_ready": False})
                await self._write({"ok": False, "ng": False, "error": False})
                await self._wait_ack_low()
            except PlcError:
                log.warning("PLC %s: lost after signalling %r; the reconnect clears the outputs", _endpoint(self.io),
                            part_id)
            return report

    async def _wait_ack(self, stale: bool) -> float | None:
        """Milliseconds from ResultReady to ResultAck, or None when it did not come within ack_timeout_s. A level
        left high from before must fall first."""
        start = time.monotonic()
        deadline = start + self.ack_timeout_s
        must_fall = stale
        while True:
            level = await self._read_bool("ack")
            if must_fall and not level:
                must_fall = False
            elif level and not must_fall:
                return (time.monotonic() - start) * 1000
            if time.monotonic() >= deadline:
                log.warning("PLC %s: no ResultAck within %.1f s", _endpoint(self.io), self.ack_timeout_s)
                return None
            await asyncio.sleep(POLL_S)

    async def _wait_ack_low(self) -> None:
        deadline = time.monotonic() + self.ack_timeout_s
        while await self._read_bool("ack"):
            if time.monotonic() >= deadline:
                log.warning("PLC %s: ResultAck still high %.1f s after ResultReady fell", _endpoint(self.io),
                            self.ack_timeout_s)
                return
            await asyncio.sleep(POLL_S)

    # --- one request at a time, failures noticed

    async def _read_bool(self, signal: str) -> bool:
        return await self._io(f"read {signal}", self.io.read_bool(signal))

    async def _write(self, values: dict[str, bool]) -> None:
        values = self._outputs(values)
        if values:
            await self._io(f"write {', '.join(values)}", self.io.write_bools(values))

    async def _io(self, what: str, request: Coroutine[Any, Any, T]) -> T:
        """Runs one PlcIO request under the lock. When it fails and the transport is no longer connected, the state
        becomes 'reconnecting' and keep_connected is woken; the PlcError goes on to the caller either way."""
        if self._state != "connected" or not self.io.connected:
            request.close()
            raise PlcError(f"PLC {_endpoint(self.io)}: not connected ({self._state}); cannot {what}")
        try:
            async with self._io_lock:
                result = await request
        except PlcError as exc:
            if not self.io.connected and self._state == "connected":
                self._set_state("reconnecting", str(exc))
                self._lost.set()
            raise
        self._last_ok_io = time.monotonic()
        return result


def _endpoint(io: PlcIO) -> str:
    return str(getattr(io, "endpoint", type(io).__name__))


def _configured(io: PlcIO) -> frozenset[str] | None:
    """The signals this transport has an address for, where it says (`signals` of OpcUaIO and ModbusIO)."""
    names = getattr(io, "signals", None)
    return frozenset(names) if names is not None else None


def _has(io: PlcIO, signal: str) -> bool:
    names = _configured(io)
    return names is None or signal in names


async def _first_of(*waits: Awaitable[Any], timeout_s: float) -> None:
    """Waits until the first of `waits` completes or `timeout_s` passes, cancelling the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(timeout_s)
    finally:
        for task in tasks:
            task.cancel()
