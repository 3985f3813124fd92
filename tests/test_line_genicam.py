"""The GenICam source against Debian's fake GigE Vision camera (`arv-fake-gv-camera-0.8 -i 127.0.0.1`, package
aravis-tools): the real GigE Vision control and stream protocols over loopback, one fresh camera per test.

The fake camera has TriggerSource Line0 but no way to pulse it, so the hardware trigger is tested as far as it can
be without wiring: the camera is configured for it (TriggerMode On, TriggerSource Line0, read back from the camera)
and sends nothing until a pulse comes.

Nothing here skips: without aravis-tools, gir1.2-aravis-0.8 or PyGObject the tests fail and say what to install.
"""

from __future__ import annotations

import asyncio
import errno
import io
import itertools
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest
from PIL import Image

from filo_line.sources.base import Frame, SourceError
from filo_line.sources.genicam import GenicamSource
from filo_line.sources.genicam_pixels import PixelFormatError, frame_to_png
from tests.service_fixtures import stop_process

FAKE_CAMERA = "arv-fake-gv-camera-0.8"
SERIAL = "FILO1"
CAMERA_ID = f"Aravis-Fake-{SERIAL}"
GVCP_PORT = 3956  # GigE Vision's control port, where the fake camera listens
SIZE = (512, 512)  # the fake camera's sensor
OFFERED = {"Mono8", "Mono16", "RGB8", "BayerRG8", "BayerGR8", "BayerGB8", "BayerBG8"}  # its PixelFormat entries
PNG_MODES = {"Mono8": "L", "Mono16": "I;16", "RGB8": "RGB", "BayerRG8": "RGB", "BayerGR8": "RGB",
             "BayerGB8": "RGB", "BayerBG8": "RGB"}
FRAME_ID_WRAP = 65535  # GigE Vision's 16-bit block id: 65535 is followed by 1


def run(scenario: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(scenario, 60)

    return asyncio.run(bounded())


def gvcp_port_taken() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", GVCP_PORT))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


class FakeCamera:
    def __init__(self) -> None:
        binary = shutil.which(FAKE_CAMERA)
        if binary is None:
            pytest.fail(f"{FAKE_CAMERA} is missing: apt install aravis-tools gir1.2-aravis-0.8 (the GenICam tests "
                        "need Debian's fake GigE Vision camera)")
        if gvcp_port_taken():
            pytest.fail(f"127.0.0.1:{GVCP_PORT} is taken (another fake camera?): the test cannot start its own")
        self.process = subprocess.Popen([binary, "-i", "127.0.0.1", "-s", SERIAL], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 10
        while not gvcp_port_taken():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{FAKE_CAMERA} did not come up: {self.process.stdout.read() if self.process.stdout else ''}")
            time.sleep(0.02)

    def stop(self) -> None:
        stop_process(self.process, 5)


@pytest.fixture
def camera() -> Iterator[FakeCamera]:
    fake = FakeCamera()
    try:
        yield fake
    finally:
        fake.stop()


def aravis() -> Any:
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis
    except (ImportError, ValueError) as exc:
        pytest.fail(f"Aravis through PyGObject is missing ({exc}): apt install gir1.2-aravis-0.8, "
                    "pip install 'PyGObject<3.51'")
    return Aravis


def set_pixel_format(pixel_format: str) -> set[str]:
    """Sets the camera's PixelFormat as a line engineer would with the vendor's tool, then lets go of the camera
    (GigE Vision gives one program control at a time); returns the formats the camera offers."""
    Aravis = aravis()
    if CAMERA_ID not in {Aravis.get_device_id(i) for i in range(Aravis.get_n_devices())}:
        Aravis.update_device_list()  # a second's discovery, once per test process
    cam = Aravis.Camera.new(CAMERA_ID)
    offered = set(cam.dup_available_pixel_formats_as_strings())
    cam.set_pixel_format_from_string(pixel_format)
    del cam
    return offered


def png(frame: Frame) -> Image.Image:
    image = Image.open(io.BytesIO(frame.data))
    assert image.format == "PNG"
    return image


def consecutive(ids: list[int]) -> bool:
    return all(b == a % FRAME_ID_WRAP + 1 for a, b in itertools.pairwise(ids))


def in_order(ids: list[int]) -> bool:
    return all(0 < (b - a) % FRAME_ID_WRAP < 100 for a, b in itertools.pairwise(ids))


def test_software_trigger_gives_one_frame_per_trigger(camera: FakeCamera) -> None:
    async def scenario() -> tuple[list[Frame], Frame, str]:
        source = GenicamSource(CAMERA_ID, "software", timeout_s=5)
        await source.start()
        try:
            frames = [await source.acquire("", timeout_s=5) for _ in range(3)]
            named = await source.acquire("SN 42/7", timeout_s=5)  # the PLC's part id, when it triggered
            with pytest.raises(SourceError, match="acquire"):
                await anext(source.frames())
            return frames, named, await source.check()
        finally:
            await source.stop()

    frames, named, check = run(scenario())
    ids = [int(f.part_id) for f in frames]
    assert consecutive(ids), ids  # one frame per trigger, none in between
    assert [f.name for f in frames] == [f"{i}.png" for i in ids]
    assert all(png(f).size == SIZE and png(f).mode == "L" for f in frames)
    assert frames[0].acquired_at <= frames[1].acquired_at <= frames[2].acquired_at
    assert (named.part_id, named.name) == ("SN 42/7", "SN_42_7.png")
    assert "TriggerMode On, TriggerSource Software" in check


def test_free_running_frames_arrive_in_order(camera: FakeCamera) -> None:
    async def scenario() -> tuple[list[Frame], list[Frame]]:
        source = GenicamSource(CAMERA_ID, "free", timeout_s=5)
        await source.start()
        frames: list[Frame] = []
        stream = source.frames()
        try:
            async for frame in stream:
                frames.append(frame)
                if len(frames) == 3:
                    break
        finally:
            await source.stop()
        after_stop = [frame async for frame in source.frames()]  # a stopped source's frames() ends
        return frames, after_stop

    frames, after_stop = run(scenario())
    ids = [int(f.part_id) for f in frames]
    assert in_order(ids), ids  # in arrival order (a frame may be dropped while the previous one encodes)
    assert all(png(f).size == SIZE for f in frames)
    assert after_stop == []


def test_hardware_trigger_waits_for_the_line(camera: FakeCamera) -> None:
    async def scenario() -> tuple[str, bool]:
        source = GenicamSource(CAMERA_ID, "hardware", timeout_s=5)
        await source.start()
        try:
            check = await source.check()
            try:
                await asyncio.wait_for(anext(source.frames()), 0.5)
                sent_without_pulse = True
            except asyncio.TimeoutError:
                sent_without_pulse = False
            with pytest.raises(TimeoutError, match=CAMERA_ID):  # a PLC-triggered part whose pulse never came
                await source.acquire("P-1", timeout_s=0.3)
            return check, sent_without_pulse
        finally:
            await source.stop()

    check, sent_without_pulse = run(scenario())
    assert "TriggerMode On, TriggerSource Line0" in check
    assert not sent_without_pulse


def test_every_offered_pixel_format_becomes_a_png_of_the_right_size_and_mode(camera: FakeCamera) -> None:
    offered = set_pixel_format("Mono8")
    assert offered == OFFERED  # a new format in the fake camera must be added here (and converted)

    async def one(pixel_format: str) -> tuple[Frame, str]:
        set_pixel_format(pixel_format)
        source = GenicamSource(CAMERA_ID, "software", timeout_s=5)
        await source.start()
        try:
            return await source.acquire("", timeout_s=5), await source.check()
        finally:
            await source.stop()

    for pixel_format in sorted(OFFERED):
        frame, check = run(one(pixel_format))
        image = png(frame)
        assert (image.size, image.mode) == (SIZE, PNG_MODES[pixel_format]), pixel_format
        assert f"{pixel_format} 512x512" in check


def test_check_opens_the_camera_and_reports_it(camera: FakeCamera) -> None:
    line = run(GenicamSource(CAMERA_ID, "software").check())
    assert line.startswith(f"GenICam camera {CAMERA_ID}: Aravis Fake, Mono8 512x512")


def test_the_first_camera_is_taken_when_no_id_is_given(camera: FakeCamera) -> None:
    line = run(GenicamSource(None, "free").check())
    assert CAMERA_ID in line


def test_a_stopped_camera_is_a_source_error_naming_it(camera: FakeCamera) -> None:
    async def scenario() -> tuple[str, str]:
        source = GenicamSource(CAMERA_ID, "software", timeout_s=5)
        await source.start()
        try:
            await source.acquire("", timeout_s=5)
            camera.stop()
            # the trigger command fails once Aravis gives up on the camera (its own retries: seconds, more on a
            # loaded machine); the wait for a frame outlasts that, so the failure is the trigger's, not a timeout
            with pytest.raises(SourceError) as while_running:
                await source.acquire("", timeout_s=30)
        finally:
            await source.stop()
        with pytest.raises(SourceError) as at_start:
            await GenicamSource(CAMERA_ID, "software", timeout_s=5).start()
        return str(while_running.value), str(at_start.value)

    while_running, at_start = run(scenario())
    assert CAMERA_ID in while_running
    assert "software trigger failed" in while_running
    assert CAMERA_ID in at_start
    assert "cannot open" in at_start


def test_bayer_mosaics_are_demosaiced_with_the_genicam_tile_order() -> None:
    """A uniform colour (R 200, G 100, B 50) laid out as each GenICam Bayer tile comes back as that colour."""
    import numpy as np

    colour = {"R": 200, "G": 100, "B": 50}
    for name, tile in {"BayerRG8": "RGGB", "BayerGR8": "GRBG", "BayerGB8": "GBRG", "BayerBG8": "BGGR"}.items():
        mosaic = np.zeros((8, 8), np.uint8)
        for i, channel in enumerate(tile):
            mosaic[i // 2::2, i % 2::2] = colour[channel]
        image = Image.open(io.BytesIO(frame_to_png(mosaic.tobytes(), 8, 8, name)))
        assert image.mode == "RGB"
        assert image.getpixel((4, 4)) == (200, 100, 50), name


def test_mono16_keeps_all_sixteen_bits() -> None:
    import numpy as np

    values = np.array([[0, 1, 0x1234, 0xFFFF]], dtype="<u2")
    image = Image.open(io.BytesIO(frame_to_png(values.tobytes(), 4, 1, "Mono16")))
    assert image.mode == "I;16"
    assert [image.getpixel((x, 0)) for x in range(4)] == [0, 1, 0x1234, 0xFFFF]


def test_a_format_without_a_conversion_or_a_short_frame_is_refused_by_name() -> None:
    with pytest.raises(PixelFormatError, match="Mono12.*Mono8, Mono16"):
        frame_to_png(bytes(8), 2, 2, "Mono12")
    with pytest.raises(PixelFormatError, match="needs 12 bytes, got 4"):
        frame_to_png(bytes(4), 2, 2, "RGB8")
