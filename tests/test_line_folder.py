"""The hot folder as a camera, with real files and inotify: only whole files, each taken once (across restarts
too), finished into done/ or failed/ with the reason beside it."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from filo_line.sources.base import SourceError
from filo_line.sources.folder import FolderSource
from tests.line_fakes import write_image
from tests.service_fixtures import png_bytes


def run(coro_fn) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 30))


async def started(path: Path, pattern: str = "*.png", **kw: float) -> FolderSource:
    source = FolderSource(path, pattern, **kw)
    await source.start()
    return source


async def next_frame(source: FolderSource, timeout: float = 5.0):
    it = source.frames()
    return await asyncio.wait_for(it.__anext__(), timeout)


def test_a_closed_file_is_taken_once_whole_and_finished_into_done_or_failed(tmp_path):
    async def main() -> None:
        source = await started(tmp_path)
        try:
            data = write_image(tmp_path, "p-1.png", 1)
            (tmp_path / "notes.txt").write_text("not mine")  # outside the pattern
            frame = await next_frame(source)
            assert (frame.data, frame.part_id, frame.name) == (data, "p-1", "p-1.png")
            assert frame.acquired_at <= time.time() and (tmp_path / "processing" / "p-1.png").exists()
            assert not (tmp_path / "p-1.png").exists()
            frame.finish("done", "")
            assert (tmp_path / "done" / "p-1.png").read_bytes() == data
            write_image(tmp_path, "p-2.png", 2)
            frame = await next_frame(source)
            frame.finish("failed", "broken PNG file")
            assert (tmp_path / "failed" / "p-2.png.reason.txt").read_text() == "broken PNG file\n"
            with pytest.raises(asyncio.TimeoutError):
                await next_frame(source, 0.8)  # notes.txt is never offered, p-1 never again
        finally:
            await source.stop()
        assert (tmp_path / "notes.txt").exists()

    run(main)


def test_a_file_still_being_written_is_not_taken_until_its_writer_closes_it(tmp_path):
    async def main() -> None:
        source = await started(tmp_path, settle_s=0.2)
        try:
            data = png_bytes(seed=3)
            f = open(tmp_path / "slow.png", "wb")  # noqa: SIM115 (held open across awaits on purpose)
            f.write(data[:100])
            f.flush()
            with pytest.raises(asyncio.TimeoutError):
                await next_frame(source, 1.0)  # five times the settle time, and still being written
            f.write(data[100:])
            f.close()
            frame = await next_frame(source)
            assert frame.data == data
        finally:
            await source.stop()

    run(main)


def test_files_renamed_or_moved_into_the_folder_are_taken_and_in_their_order(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    watched = tmp_path / "in"
    watched.mkdir()

    async def main() -> None:
        source = await started(watched, settle_s=0.2)
        try:
            a = write_image(watched, "a.png.part", 1)  # an FTP server's upload name, renamed when whole
            os.rename(watched / "a.png.part", watched / "a.png")
            b = write_image(outside, "b.png", 2)  # written elsewhere, moved in whole: no close here
            os.rename(outside / "b.png", watched / "b.png")
            first, second = await next_frame(source), await next_frame(source)
            assert [(first.name, first.data), (second.name, second.data)] == [("a.png", a), ("b.png", b)]
        finally:
            await source.stop()

    run(main)


def test_files_left_by_a_crash_come_first_and_waiting_ones_keep_their_age(tmp_path):
    (tmp_path / "processing").mkdir()
    left = write_image(tmp_path / "processing", "taken-before.png", 1)  # taken, never finished: a kill -9
    waiting = write_image(tmp_path, "waited.png", 2)
    old = time.time() - 3600
    os.utime(tmp_path / "waited.png", (old, old))

    async def main() -> None:
        source = await started(tmp_path, settle_s=0.2)
        try:
            first = await next_frame(source)
            second = await next_frame(source)
        finally:
            await source.stop()
        assert (first.name, first.data) == ("taken-before.png", left)
        assert (second.name, second.data) == ("waited.png", waiting)
        assert second.acquired_at == pytest.approx(old, abs=1)  # it waited an hour: its part is past the gate
        first.finish("done", "")
        assert (tmp_path / "done" / "taken-before.png").exists() and not list((tmp_path / "processing").glob("t*"))

    run(main)


def test_a_take_cut_between_its_link_and_its_unlink_is_finished_at_start(tmp_path):
    (tmp_path / "processing").mkdir()
    data = write_image(tmp_path, "half-taken.png", 1)
    os.link(tmp_path / "half-taken.png", tmp_path / "processing" / "half-taken.png")  # then a kill -9

    async def main() -> None:
        source = await started(tmp_path, settle_s=0.2)
        try:
            frame = await next_frame(source)
            with pytest.raises(asyncio.TimeoutError):
                await next_frame(source, 0.8)  # offered once, not twice
        finally:
            await source.stop()
        assert (frame.name, frame.data) == ("half-taken.png", data)
        assert not (tmp_path / "half-taken.png").exists()

    run(main)


def test_acquire_takes_the_next_file_for_the_plcs_part_id_or_times_out(tmp_path):
    async def main() -> None:
        source = await started(tmp_path)
        try:
            with pytest.raises(TimeoutError, match="no file"):
                await source.acquire("SN-1", 0.3)
            write_image(tmp_path, "frame-0001.png", 1)
            frame = await source.acquire("SN-1", 5)
            assert (frame.part_id, frame.name) == ("SN-1", "frame-0001.png")
        finally:
            await source.stop()

    run(main)


def test_same_names_never_overwrite_and_an_empty_file_is_offered_for_its_error(tmp_path):
    async def main() -> None:
        source = await started(tmp_path)
        try:
            one = write_image(tmp_path, "img.png", 1)
            f1 = await next_frame(source)
            two = write_image(tmp_path, "img.png", 2)  # the camera reuses its name
            f2 = await next_frame(source)
            f1.finish("done", "")
            f2.finish("done", "")
            (tmp_path / "empty.png").write_bytes(b"")
            empty = await next_frame(source)
            assert empty.data == b""
        finally:
            await source.stop()
        assert {p.read_bytes() for p in (tmp_path / "done").iterdir()} == {one, two}

    run(main)


def test_a_missing_folder_is_a_clear_source_error_and_check_says_what_waits(tmp_path):
    async def main() -> None:
        with pytest.raises(SourceError, match="does not exist"):
            await FolderSource(tmp_path / "nope").start()
        write_image(tmp_path, "a.png", 1)
        line = await FolderSource(tmp_path, "*.png").check()
        assert "readable and writable" in line and "1 waiting" in line

    run(main)
