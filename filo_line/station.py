"""One station's loop: images in, verdicts to the PLC, reports out, nothing lost.

The promise: every part gets exactly one PLC signal by its deadline (`deadline_ms` from its trigger), in trigger
order. The service gets the time that is left (the part's signal point, `deadline_ms` less the margin kept for
writing the result) both as the request's own time limit and as its `deadline_ms`; a transient failure (busy,
unavailable, unreachable) is tried again while time is left. At the signal point the station signals what it
has: the verdict, or the fail-safe (decision.py). An image without a verdict goes to the spool and is inspected
when the service is back (replay.py); its late verdict is published, never signalled.

Untriggered (no PLC, or `plc.triggered: false`): each image is a part, triggered when it arrived; parts are
inspected side by side (at most `MAX_IN_FLIGHT`) and signalled one after the other in arrival order. Since each
signal is a whole handshake, the wait for one part's verdict ends early where the parts queued behind it would
otherwise miss their own deadlines (`_latest_start`).
Triggered: TriggerReady is high while the station can take a part; on Trigger's rising edge it reads PartId,
drops TriggerReady, acquires the image, inspects, signals, and raises TriggerReady again.

A PLC that is away when a part is triggered or signalled: the station waits for it until the part's deadline; if
it comes back in time the part gets the fail-safe, else it is counted as a missed signal.

An image older than its deadline when the station first sees it (written while the connector was away, or left
over in a triggered station's folder) belongs to no waiting part: it is inspected and published late, and never
signalled (counted as unsignalled; as a missed signal where it arrived while the station ran and a PLC waited).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from filo_line.client import Failure, Outcome, ServiceClient, Verdict, request_id_for, sanitise_part_id
from filo_line.config import StationConfig
from filo_line.decision import Decision, decide, fail_safe
from filo_line.imagecheck import image_problem
from filo_line.metrics import LineMetrics
from filo_line.plc.base import PlcError
from filo_line.publish.base import Publisher
from filo_line.report import PartReport, Signalled
from filo_line.sources.base import Frame, Source, SourceError
from filo_line.spool import Spool, SpoolFull, SpoolMeta

log = logging.getLogger("filo.line.station")

T = TypeVar("T")

MAX_IN_FLIGHT = 4  # untriggered parts inspected side by side
LATE_TIMEOUT_S = 60.0  # an image past its deadline: how long one try may take
MIN_ATTEMPT_S = 0.02  # less time than this left: no new request
RETRY_PAUSES_S = (0.05, 0.1, 0.2, 0.4)
SIGNAL_GUARD_S = 10.0
FIRST_CYCLE_S = 0.05
STOP_GRACE_S = 5.0  # on stop, how long the station waits for its background work  # a handshake's duration until one was measured  # a handshake that hangs longer than this is treated as a PLC that went away


def signal_margin_s(deadline_s: float) -> float:
    """The part of a deadline kept for writing the result to the PLC: 10 %, at least 30 ms, at most 250 ms."""
    return min(0.25, max(0.03, deadline_s * 0.1))


class SignalReport(Protocol):
    acked: bool
    write_ms: float
    ack_ms: float | None


class Handshake(Protocol):
    """What a station needs of the PLC handshake (filo_line/plc/handshake.py's PlcHandshake)."""

    @property
    def connected(self) -> bool: ...

    async def set_trigger_ready(self, ready: bool) -> None: ...

    async def wait_trigger(self, stop: asyncio.Event | None = None) -> str: ...

    async def signal(self, part_id: str, ok: bool, error: bool) -> SignalReport: ...

    async def keep_connected(self, stop: asyncio.Event) -> None:
        """Connect, and reconnect with backoff whenever the PLC goes away, until `stop` (run beside the station)."""
        ...


@dataclass
class Part:
    part_id: str  # as sent to the service and written to the PLC
    triggered_at: float  # time.time()
    deadline_at: float  # time.time() by which the PLC must have the result
    signal_at: float  # time.monotonic() at which the station signals what it has
    deadline_mono: float
    frame: Frame | None = None
    request_id: str | None = None
    problem: str | None = None  # why it cannot be inspected (no image, a broken one)
    task: asyncio.Task[Outcome] | None = None
    plc_away: bool = False  # the PLC was away when the part was triggered


async def _until(awaitable: Awaitable[T], stop: asyncio.Event) -> T | None:
    """The awaitable's result, or None (and it cancelled) once `stop` is set first."""
    work = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work
    return None


class _Waiting:
    """The untriggered parts in arrival order, waiting to be concluded; the signaller sees who is behind."""

    def __init__(self) -> None:
        self._parts: deque[Part] = deque()
        self._closed = False
        self._changed = asyncio.Event()

    def put(self, part: Part) -> None:
        self._parts.append(part)
        self._changed.set()

    def close(self) -> None:
        self._closed = True
        self._changed.set()

    async def next(self) -> Part | None:
        while not self._parts:
            if self._closed:
                return None
            self._changed.clear()
            await self._changed.wait()
        return self._parts.popleft()

    def behind(self) -> list[Part]:
        return list(self._parts)

    async def arrival(self) -> None:
        """Returns when the next part is put."""
        self._changed.clear()
        await self._changed.wait()


class Station:
    def __init__(self, config: StationConfig, source: Source, client: ServiceClient, spool: Spool,
                 publishers: Sequence[Publisher], metrics: LineMetrics, handshake: Handshake | None = None) -> None:
        self.config = config
        self.name = config.name
        self.source = source
        self.client = client
        self.spool = spool
        self.publishers = list(publishers)
        self.metrics = metrics
        self.handshake = handshake
        self.deadline_s = config.deadline_ms / 1000
        self.margin_s = signal_margin_s(self.deadline_s)
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._late_slots = asyncio.Semaphore(1)
        self._background: set[asyncio.Task[Any]] = set()
        self._started_at = time.time()
        self._cycles: deque[float] = deque(maxlen=20)  # the last handshakes' durations, result to Ack dropped
        metrics.station(self.name, handshake is not None)

    # --- running ---

    async def run(self, stop: asyncio.Event) -> None:
        self._started_at = time.time()
        await self.source.start()
        watcher = asyncio.create_task(self._watch_plc(stop)) if self.handshake is not None else None
        try:
            if self.config.triggered:
                await self._run_triggered(stop)
            else:
                await self._run_untriggered(stop)
        finally:
            if watcher is not None:
                watcher.cancel()
            if self._background:  # spool writes finish; a late inspection still running is cut off: its file
                # stays in processing/ and is offered again at the next start
                _, unfinished = await asyncio.wait(self._background, timeout=STOP_GRACE_S)
                for task in unfinished:
                    task.cancel()
                await asyncio.gather(*unfinished, return_exceptions=True)
            await self.source.stop()

    async def _watch_plc(self, stop: asyncio.Event) -> None:
        assert self.handshake is not None
        gauge = self.metrics.plc_connected.labels(self.name)
        while not stop.is_set():
            gauge.set(1 if self.handshake.connected else 0)
            await asyncio.sleep(0.25)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _new_part(self, raw_part_id: str, triggered_at: float) -> Part:
        now_wall, now_mono = time.time(), time.monotonic()
        deadline_mono = now_mono + (triggered_at + self.deadline_s - now_wall)
        return Part(part_id=sanitise_part_id(raw_part_id), triggered_at=triggered_at,
                    deadline_at=triggered_at + self.deadline_s, signal_at=deadline_mono - self.margin_s,
                    deadline_mono=deadline_mono,
                    plc_away=self.handshake is not None and not self.handshake.connected)

    def _attach(self, part: Part, frame: Frame) -> None:
        """The part's image: checked, given its stable request id, and sent to the service."""
        part.frame = frame
        part.request_id = request_id_for(self.name, part.part_id, frame.data)
        part.problem = image_problem(frame.data)
        if part.problem is None:
            part.task = asyncio.create_task(self._inspect(part))

    def _stale(self, frame: Frame) -> bool:
        """Older than a whole deadline: its part is past the gate."""
        return frame.acquired_at + self.deadline_s - self.margin_s < time.time()

    async def _run_untriggered(self, stop: asyncio.Event) -> None:
        order = _Waiting()
        signaller = asyncio.create_task(self._conclude_in_order(order))
        frames: AsyncIterator[Frame] = self.source.frames()
        try:
            while not stop.is_set():
                frame = await _until(frames.__anext__(), stop)
                if frame is None:
                    break
                if self._stale(frame):
                    self._late_arrival(frame)
                    continue
                part = self._new_part(frame.part_id, frame.acquired_at)
                self._attach(part, frame)
                order.put(part)
        except SourceError as exc:
            log.error("station %s: the source failed (%s); stopping", self.name, exc)
            raise
        finally:
            order.close()  # the parts in flight are concluded by their deadlines
            await signaller
            with contextlib.suppress(Exception):
                await frames.aclose()  # type: ignore[attr-defined]

    async def _conclude_in_order(self, order: _Waiting) -> None:
        while (part := await order.next()) is not None:
            await self._conclude(part, order)

    def _latest_start(self, part: Part, behind: list[Part]) -> float:
        """When the signaller must stop waiting for `part`'s verdict: at its own signal point, or earlier where the
        parts queued behind it would otherwise miss theirs, each needing one handshake cycle before it."""
        cycle = max(self._cycles, default=FIRST_CYCLE_S) if self.handshake is not None else 0.0
        latest = part.signal_at
        for k, later in enumerate(behind, 1):
            latest = min(latest, later.signal_at - k * cycle)
        return latest

    async def _run_triggered(self, stop: asyncio.Event) -> None:
        hs = self.handshake
        assert hs is not None
        while not stop.is_set():
            if not hs.connected:
                await _until(asyncio.sleep(0.05), stop)
                continue
            try:
                await hs.set_trigger_ready(True)
                raw_id = await _until(hs.wait_trigger(stop), stop)
            except PlcError as exc:
                log.warning("station %s: PLC: %s", self.name, exc)
                await _until(asyncio.sleep(0.2), stop)
                continue
            if raw_id is None or stop.is_set():
                break
            if not str(raw_id).strip():
                log.warning("station %s: the PLC's PartId was empty at its trigger (is part_id's address right?); "
                            "the part is recorded as 'part'", self.name)
            part = self._new_part(str(raw_id), time.time())
            with contextlib.suppress(PlcError):
                await hs.set_trigger_ready(False)
            await self._acquire(part, str(raw_id))
            await self._conclude(part)
        with contextlib.suppress(PlcError):
            await hs.set_trigger_ready(False)

    async def _acquire(self, part: Part, raw_id: str) -> None:
        """The triggered part's image; a file older than its own deadline is a leftover, handled late."""
        while True:
            left = part.signal_at - time.monotonic()
            try:
                frame = await self.source.acquire(raw_id, max(0.0, left))
            except (TimeoutError, asyncio.TimeoutError, SourceError) as exc:
                part.problem = f"no image: {exc}"
                return
            if self._stale(frame):
                frame.part_id = Path(frame.name).stem
                self._late_arrival(frame)
                continue
            self._attach(part, frame)
            return

    # --- one part ---

    async def _inspect(self, part: Part) -> Outcome:
        """Ask the service until it gives a verdict, refuses, or the part's time is up."""
        assert part.frame is not None and part.request_id is not None
        last: Failure | None = None
        attempt = 0
        async with self._slots:
            while True:
                left = part.signal_at - time.monotonic()
                if left < MIN_ATTEMPT_S:
                    return last or Failure("timeout", f"no time left for the service ({self.config.deadline_ms} ms)")
                outcome = await self.client.inspect(
                    part.frame.data, part.frame.name, category=self.config.category, part_id=part.part_id,
                    request_id=part.request_id, source=self.name, timeout_s=left, deadline_ms=int(left * 1000))
                if isinstance(outcome, Verdict):
                    return outcome
                self.metrics.service_errors.labels(self.name, outcome.reason).inc()
                if not outcome.transient:
                    return outcome
                last = outcome
                pause = max(RETRY_PAUSES_S[min(attempt, len(RETRY_PAUSES_S) - 1)], outcome.retry_after_s or 0.0)
                attempt += 1
                await asyncio.sleep(min(pause, max(0.0, part.signal_at - time.monotonic())))

    async def _outcome(self, part: Part, order: _Waiting | None) -> Outcome | None:
        """The part's outcome by the time the signaller must stop waiting for it (its signal point, or earlier
        for the parts queued behind it, reconsidered as they arrive); None when it was never sent."""
        if part.task is None:
            return None
        while not part.task.done():
            until = part.signal_at if order is None else self._latest_start(part, order.behind())
            left = until - time.monotonic()
            if left <= 0:
                part.task.cancel()
                self.metrics.service_errors.labels(self.name, "timeout").inc()
                return Failure("timeout", f"no verdict within {self.config.deadline_ms} ms of the trigger")
            waits = {part.task}
            if order is not None:
                waits.add(asyncio.ensure_future(order.arrival()))
            await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for w in waits - {part.task}:
                w.cancel()
        return part.task.result()

    async def _conclude(self, part: Part, order: _Waiting | None = None) -> None:
        outcome = await self._outcome(part, order)
        decision = decide(outcome, self.config.on_timeout) if outcome is not None \
            else fail_safe(self.config.on_timeout, "error", part.problem or "no image")
        signalled_at, signalled = await self._signal(part, decision)
        if decision.error:
            log.info("station %s: part %s: %s, signalled %s + Error", self.name, part.part_id, decision.reason,
                     "OK" if decision.ok else "NG")
        done_at = signalled_at if signalled_at is not None else time.time()
        if signalled_at is not None:
            self.metrics.latency.labels(self.name).observe(max(0.0, signalled_at - part.triggered_at))
        self.metrics.parts.labels(self.name, decision.verdict).inc()
        report = PartReport.build(
            station=self.name, part_id=part.part_id, request_id=part.request_id or "", outcome=outcome,
            verdict=decision.verdict, reason=decision.reason, triggered_at=part.triggered_at, done_at=done_at,
            signalled_at=signalled_at, signalled=signalled, late=False,
            image_name=part.frame.name if part.frame else "")
        self.publish(report, part.frame.data if part.frame else None)
        if part.frame is not None:
            self._spawn(self._file_away(part, decision, signalled_at, signalled))

    async def _signal(self, part: Part, decision: Decision) -> tuple[float | None, Signalled | None]:
        """Write the result to the PLC by the part's deadline: (when it was written, what) or (None, None) for a
        miss. Without a PLC the result is "signalled" when it is decided."""
        hs = self.handshake
        if hs is None:
            return time.time(), None
        away = part.plc_away
        while True:
            while not hs.connected:
                away = True
                if time.monotonic() >= part.deadline_mono:
                    return self._missed(part, "the PLC was away until the deadline")
                await asyncio.sleep(0.01)
            if time.monotonic() >= part.deadline_mono:
                return self._missed(part, "the deadline passed before the PLC could be told")
            if away and not decision.error:
                decision = fail_safe(self.config.on_timeout, decision.verdict, "the PLC was away")
            started, cycle_started = time.time(), time.monotonic()
            try:
                report = await asyncio.wait_for(hs.signal(part.part_id, decision.ok, decision.error), SIGNAL_GUARD_S)
                self._cycles.append(time.monotonic() - cycle_started)
            except (PlcError, asyncio.TimeoutError) as exc:
                log.warning("station %s: signalling part %s failed (%s)", self.name, part.part_id, exc)
                away = True
                await asyncio.sleep(0.01)
                continue
            signalled_at = started + report.write_ms / 1000
            if signalled_at > part.deadline_at:
                self.metrics.deadline_misses.labels(self.name).inc()
                log.error("station %s: part %s signalled %.0f ms after its deadline", self.name, part.part_id,
                          (signalled_at - part.deadline_at) * 1000)
            if not report.acked:
                log.warning("station %s: the PLC did not acknowledge part %s", self.name, part.part_id)
            return signalled_at, Signalled.of(decision)

    def _missed(self, part: Part, why: str) -> tuple[None, None]:
        self.metrics.deadline_misses.labels(self.name).inc()
        log.error("station %s: part %s got no signal: %s", self.name, part.part_id, why)
        return None, None

    def publish(self, report: PartReport, image: bytes | None) -> None:
        for publisher in self.publishers:
            publisher.publish(report, image)

    async def _file_away(self, part: Part, decision: Decision, signalled_at: float | None,
                         signalled: Signalled | None) -> None:
        """After the signal: an image without a verdict into the spool, then the source's file done or failed."""
        frame = part.frame
        assert frame is not None and part.request_id is not None
        outcome, reason = "done", ""
        if decision.verdict == "timeout":
            meta = SpoolMeta(
                station=self.name, category=self.config.category, part_id=part.part_id, request_id=part.request_id,
                image_name=frame.name, triggered_at=part.triggered_at, signalled_at=signalled_at,
                signalled=None if signalled is None else {"ok": signalled.ok, "ng": signalled.ng,
                                                          "error": signalled.error},
                signalled_verdict=decision.verdict, reason=decision.reason or "")
            outcome, reason = await self._spool(meta, frame.data)
        elif decision.verdict == "error":
            outcome, reason = "failed", decision.reason or "failed"
        await self._finish(frame, outcome, reason)

    async def _spool(self, meta: SpoolMeta, image: bytes) -> tuple[str, str]:
        try:
            await asyncio.to_thread(self.spool.put, meta, image)
        except SpoolFull as exc:  # counted by the spool
            log.error("station %s: part %s not spooled: %s", self.name, meta.part_id, exc)
            return "failed", f"not inspected: {exc}. Put the file back into the folder to have it inspected."
        except OSError as exc:
            log.error("station %s: part %s not spooled: %s", self.name, meta.part_id, exc)
            return "failed", f"not inspected: the spool could not keep it ({exc})"
        return "done", ""

    @staticmethod
    async def _finish(frame: Frame, outcome: str, reason: str) -> None:
        if frame.finish is not None:
            await asyncio.to_thread(frame.finish, outcome, reason)

    # --- late: images past their deadline, and verdicts from the spool ---

    def _late_arrival(self, frame: Frame) -> None:
        """An image that reached the station after its part's deadline: written while the connector was away
        (counted as unsignalled), or held up while it ran (a missed signal where a PLC waits for it)."""
        if frame.acquired_at >= self._started_at and self.handshake is not None and not self.config.triggered:
            self.metrics.deadline_misses.labels(self.name).inc()
            log.error("station %s: part %s reached the station after its deadline; no signal", self.name,
                      frame.part_id)
        else:
            self.metrics.unsignalled.labels(self.name).inc()
        self._spawn(self._late(frame))

    async def _late(self, frame: Frame) -> None:
        """An image whose part is past the gate: inspected (through the spool when the service is away),
        published late, never signalled."""
        part_id = sanitise_part_id(frame.part_id)
        request_id = request_id_for(self.name, part_id, frame.data)
        problem = image_problem(frame.data)
        if problem is None:
            async with self._late_slots:
                outcome: Outcome = await self.client.inspect(
                    frame.data, frame.name, category=self.config.category, part_id=part_id, request_id=request_id,
                    source=self.name, timeout_s=LATE_TIMEOUT_S)
        else:
            outcome = Failure("refused", problem)
        if isinstance(outcome, Failure):
            self.metrics.service_errors.labels(self.name, outcome.reason).inc()
        if isinstance(outcome, Failure) and outcome.transient:
            meta = SpoolMeta(station=self.name, category=self.config.category, part_id=part_id,
                             request_id=request_id, image_name=frame.name, triggered_at=frame.acquired_at,
                             signalled_at=None, signalled=None, signalled_verdict="none",
                             reason=f"past its deadline when first seen; {outcome.describe()}")
            await self._finish(frame, *await self._spool(meta, frame.data))
            return
        self.report_late(part_id=part_id, request_id=request_id, outcome=outcome, triggered_at=frame.acquired_at,
                         signalled_at=None, signalled=None, image_name=frame.name, image=frame.data)
        await self._finish(frame, "done" if isinstance(outcome, Verdict) else "failed",
                           "" if isinstance(outcome, Verdict) else outcome.describe())

    def report_late(self, *, part_id: str, request_id: str, outcome: Outcome, triggered_at: float,
                    signalled_at: float | None, signalled: Signalled | None, image_name: str,
                    image: bytes | None) -> None:
        """Publish a verdict that came after the part's deadline (`late: true`); the PLC is not told."""
        decision = decide(outcome, self.config.on_timeout)
        verdict = "error" if isinstance(outcome, Failure) else decision.verdict
        self.metrics.late_verdicts.labels(self.name, verdict).inc()
        report = PartReport.build(
            station=self.name, part_id=part_id, request_id=request_id, outcome=outcome, verdict=verdict,
            reason=decision.reason, triggered_at=triggered_at, done_at=time.time(), signalled_at=signalled_at,
            signalled=signalled, late=True, image_name=image_name)
        self.publish(report, image)
