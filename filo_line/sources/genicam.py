"""A GenICam / GigE Vision camera as a station's image source, through Aravis (Debian's gir1.2-aravis-0.8, used
from Python through PyGObject).

Three ways to take a part's image:
- software: the PLC triggers the station and `acquire()` fires the camera's TriggerSoftware command, then takes the
  frame that answers it (TriggerMode On, TriggerSource Software).
- hardware: the camera is wired to the trigger (a light barrier, the PLC's output) on an input line (TriggerMode On,
  TriggerSource Line0, or the first line the camera has); every frame arrives through `frames()`.
- free: the camera streams continuously (TriggerMode Off) and every frame arrives through `frames()`.

Aravis is imported when a camera is opened, never when this module is, so that a line without cameras needs
neither gi nor Aravis. Every Aravis call runs on one thread of the source's own, in the order the calls are made:
the event loop never waits on the camera, and Aravis' objects are never used from two threads at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from filo_line.sources.base import Frame, SourceError
from filo_line.sources.genicam_pixels import SUPPORTED, PixelFormatError, frame_to_png, pixel_format_name

log = logging.getLogger(__name__)
T = TypeVar("T")

TRIGGERS = ("software", "hardware", "free")
N_BUFFERS = 4  # frames the stream may hold before Aravis drops the oldest: a part's frame waits while one encodes
POLL_S = 0.25  # frames() waits for a frame this long at a time, so that stop() is never held longer
GRACE_S = 0.5  # how long acquire() waits past its timeout for the camera's thread to give up by itself


def _aravis() -> tuple[Any, Any]:
    """Aravis and GLib, imported on first use."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis, GLib
    except (ImportError, ValueError) as exc:
        raise SourceError("GenICam cameras need Aravis 0.8 through PyGObject: apt install gir1.2-aravis-0.8 and "
                          f"pip install 'PyGObject<3.51' ({exc})") from exc
    return Aravis, GLib


class GenicamSource:
    """One GenICam camera (`camera_id` as Aravis names it, e.g. "Aravis-Fake-GV01"; None: the first one found),
    opened by `start()` and released by `stop()`. The camera keeps its own pixel format, region and exposure (set
    them with the vendor's tool); the formats this source turns into PNG are those of genicam_pixels.SUPPORTED.

    Frame.part_id is the PLC's part id when `acquire()` is given one, else the camera's frame id (GigE Vision
    counts frames per stream, from 1 to 65535 and round again).
    """

    def __init__(self, camera_id: str | None, trigger: Literal["software", "hardware", "free"],
                 timeout_s: float = 2.0) -> None:
        if trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {TRIGGERS}, not {trigger!r}")
        self.camera_id = camera_id
        self.trigger = trigger
        self.timeout_s = timeout_s
        self._executor: ThreadPoolExecutor | None = None
        self._camera: Any = None
        self._stream: Any = None
        self._opened_id = camera_id or "the first GenICam camera"
        self._lost = threading.Event()  # set by Aravis' heartbeat thread when the camera stops answering

    @property
    def label(self) -> str:
        """The camera's id, as errors and `check()` name it."""
        return self._opened_id

    # --- Source

    async def start(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="genicam")
        try:
            await self._run(self._open)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close)
        finally:
            executor.shutdown(wait=False)

    async def frames(self) -> AsyncIterator[Frame]:
        """Every frame as it arrives (hardware trigger, free-running); ends when the source is stopped. A camera
        that is lost, or a free-running one that sends nothing for timeout_s, raises SourceError."""
        if self.trigger == "software":
            raise SourceError(f"GenICam camera {self.label} is software-triggered: its frames come from acquire()")
        idle_since = time.monotonic()
        while self._executor is not None:
            try:
                frame = await self._run(self._next_frame, POLL_S)
            except SourceError:
                if self._executor is None:  # stopped meanwhile
                    return
                raise
            if frame is not None:
                idle_since = time.monotonic()
                yield frame
                continue
            if self._lost.is_set():
                raise SourceError(f"GenICam camera {self.label} was lost (it stopped answering); check its power "
                                  "and network")
            if self.trigger == "free" and time.monotonic() - idle_since > self.timeout_s:
                raise SourceError(f"GenICam camera {self.label} is free-running but sent no frame for "
                                  f"{self.timeout_s:.1f} s")

    async def acquire(self, part_id: str, timeout_s: float) -> Frame:
        """The part's frame: software trigger, fire TriggerSoftware and take its answer; free-running, the next
        frame; hardware trigger, the oldest frame not yet taken (the line's pulse came with the part)."""
        deadline = time.monotonic() + timeout_s
        try:
            # the camera's thread stops waiting at the deadline itself, so that no wait is left behind to take the
            # next part's frame; the grace covers only a thread held up by a camera that does not answer
            return await asyncio.wait_for(self._run(self._acquire, part_id, deadline), timeout_s + GRACE_S)
        except asyncio.TimeoutError:
            raise TimeoutError(f"GenICam camera {self.label}: no frame within {timeout_s:.1f} s") from None

    async def check(self) -> str:
        """The camera's id, vendor and model, pixel format and size and how it is triggered: from the open camera
        once started, else from opening it for the check alone."""
        if self._executor is not None:
            return await self._run(self._describe)
        probe = GenicamSource(self.camera_id, self.trigger, self.timeout_s)
        probe._executor = ThreadPoolExecutor(1, thread_name_prefix="genicam-check")
        try:
            await probe._run(probe._open_camera)
            return await probe._run(probe._describe)
        finally:
            await probe.stop()

    # --- on the camera's thread

    def _open_camera(self) -> None:
        """Opens the camera from Aravis' list of discovered devices, discovering again (a second's broadcast) when
        it is not listed or does not answer where it was: opening an id Aravis has not discovered itself may
        choose the wrong interface for the stream, and a loopback camera then sends its frames nowhere."""
        aravis, glib = _aravis()
        listed = {aravis.get_device_id(i) for i in range(aravis.get_n_devices())}
        rediscovered = not listed or (self.camera_id is not None and self.camera_id not in listed)
        if rediscovered:
            aravis.update_device_list()
        while True:
            camera_id = self.camera_id
            if camera_id is None:
                if aravis.get_n_devices() == 0:
                    raise SourceError("no GenICam camera found; check its power and that it is on this PC's subnet")
                camera_id = aravis.get_device_id(0)
            try:
                camera = aravis.Camera.new(camera_id)
                break
            except glib.Error as exc:
                if not rediscovered:
                    aravis.update_device_list()
                    rediscovered = True
                    continue
                raise SourceError(f"GenICam camera {camera_id}: cannot open it ({exc.message}); check that it is "
                                  "on and reachable, and that no other program holds it") from exc
        self._opened_id = camera_id
        self._lost.clear()
        camera.get_device().connect("control-lost", lambda _device: self._lost.set())
        self._camera = camera

    def _open(self) -> None:
        aravis, glib = _aravis()
        self._open_camera()
        camera = self._camera
        try:
            pixel_format = camera.get_pixel_format_as_string()
            if pixel_format not in SUPPORTED:
                raise SourceError(f"GenICam camera {self.label} sends {pixel_format}; set its PixelFormat to one of "
                                  f"{', '.join(SUPPORTED)}")
            camera.set_acquisition_mode(aravis.AcquisitionMode.CONTINUOUS)
            if self.trigger == "software":
                camera.set_trigger("Software")
            elif self.trigger == "hardware":
                camera.set_trigger(self._trigger_line())
            else:
                camera.clear_triggers()
            stream = camera.create_stream(None, None)
            payload = camera.get_payload()
            for _ in range(N_BUFFERS):
                stream.push_buffer(aravis.Buffer.new_allocate(payload))
            camera.start_acquisition()
        except glib.Error as exc:
            raise SourceError(f"GenICam camera {self.label}: cannot configure it ({exc.message})") from exc
        self._stream = stream

    def _trigger_line(self) -> str:
        lines = [s for s in self._camera.dup_available_trigger_sources() if s.startswith("Line")]
        if not lines:
            raise SourceError(f"GenICam camera {self.label} has no input line to trigger from")
        return "Line0" if "Line0" in lines else lines[0]

    def _close(self) -> None:
        _, glib = _aravis()
        if self._camera is not None and self._stream is not None and not self._lost.is_set():
            try:
                self._camera.stop_acquisition()
            except glib.Error as exc:
                log.warning("GenICam camera %s: stop acquisition failed (%s)", self.label, exc.message)
        # dropping the last references releases the stream and the camera's control channel
        self._stream = None
        self._camera = None

    def _acquire(self, part_id: str, deadline: float) -> Frame:
        aravis, glib = _aravis()
        stream = self._require_stream()
        if self.trigger != "hardware":
            self._drain()
        if self.trigger == "software":
            try:
                self._camera.software_trigger()
            except glib.Error as exc:
                self._lost.set()
                raise SourceError(f"GenICam camera {self.label}: software trigger failed ({exc.message})") from exc
        incomplete = 0
        while (left := deadline - time.monotonic()) > 0:
            buffer = stream.timeout_pop_buffer(max(1, int(left * 1e6)))
            if buffer is None:
                break
            broken = buffer.get_status() not in (aravis.BufferStatus.SUCCESS, aravis.BufferStatus.CLEARED)
            frame = self._to_frame(buffer, part_id)
            if frame is not None:
                return frame
            incomplete += broken  # a broken frame is not the part's: its own may still come
        if incomplete:
            raise SourceError(f"GenICam camera {self.label}: {incomplete} frame(s) arrived incomplete and no whole "
                              "one in time; check the network (packet size, cabling)")
        raise TimeoutError(f"GenICam camera {self.label}: no frame in time")

    def _next_frame(self, wait_s: float) -> Frame | None:
        buffer = self._require_stream().timeout_pop_buffer(int(wait_s * 1e6))
        return None if buffer is None else self._to_frame(buffer, "")

    def _drain(self) -> None:
        """Gives back frames that arrived before the part was asked for (free-running, or a stray trigger)."""
        stream = self._require_stream()
        while (buffer := stream.try_pop_buffer()) is not None:
            stream.push_buffer(buffer)

    def _to_frame(self, buffer: Any, part_id: str) -> Frame | None:
        """The frame of one buffer as PNG (None for an incomplete one); the buffer goes back to the stream."""
        aravis, _ = _aravis()
        acquired_at = time.time()
        try:
            status = buffer.get_status()
            frame_id = buffer.get_frame_id()
            if status == aravis.BufferStatus.CLEARED:  # handed back unfilled: not a frame (seen right after a start)
                return None
            if status != aravis.BufferStatus.SUCCESS:
                log.warning("GenICam camera %s: frame %s incomplete (%s)", self.label, frame_id, status.value_nick)
                return None
            data = buffer.get_data()
            width, height = buffer.get_image_width(), buffer.get_image_height()
            pixel_format = pixel_format_name(buffer.get_image_pixel_format())
        finally:
            self._require_stream().push_buffer(buffer)
        try:
            png = frame_to_png(data, width, height, pixel_format)
        except PixelFormatError as exc:
            raise SourceError(f"GenICam camera {self.label}: {exc}") from exc
        part = part_id or str(frame_id)
        return Frame(data=png, part_id=part, name=f"{_file_name(part)}.png", acquired_at=acquired_at)

    def _describe(self) -> str:
        _, glib = _aravis()
        camera = self._camera
        device = camera.get_device()
        try:
            region = camera.get_region()
            mode = device.get_string_feature_value("TriggerMode")
            source = device.get_string_feature_value("TriggerSource")
            text = (f"GenICam camera {self.label}: {camera.get_vendor_name()} {camera.get_model_name()}, "
                    f"{camera.get_pixel_format_as_string()} {region.width}x{region.height}, "
                    f"TriggerMode {mode}, TriggerSource {source}")
        except glib.Error as exc:
            raise SourceError(f"GenICam camera {self.label}: cannot read its settings ({exc.message})") from exc
        return text

    def _require_stream(self) -> Any:
        if self._stream is None:
            raise SourceError(f"GenICam camera {self.label} is not started")
        return self._stream

    # --- the camera's thread

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise SourceError(f"GenICam camera {self.label} is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, call, *args)


def _file_name(part_id: str) -> str:
    """A part id as a file name: characters that a file system or a URL would trip on become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", part_id).strip(".") or "frame"
