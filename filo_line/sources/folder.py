"""A hot folder as a camera: the FTP drop most line cameras can write to.

A file is taken only once it is whole: on Linux when its writer closes it (inotify's close-write, through
watchdog) or when it was renamed into the folder (how FTP servers and careful writers finish an upload); a file
that appears without a writer (moved in from elsewhere, or waiting when the station starts) once its size has
not changed for `settle_s`; a file whose writer never closes it after `stale_writer_s` without a change (the
image check then finds it whole or not). Where the platform reports no closes, size stability decides alone.

Each file is processed once, across restarts too: it is taken by moving it into `processing/` (see `take`), and
finished by moving it to `done/` or to `failed/` with `<name>.reason.txt` beside it. A crash leaves taken files
in `processing/`; the next start offers them first. A file that cannot be
read is still offered (with no bytes), so the station signals Error for its part, and it lands in `failed/`
with the read error as its reason: no file stops the station.

A frame's `acquired_at`, an untriggered part's trigger, is when its file was whole (`whole_at`): the file's
mtime where it is this machine's time of the last write, else when the file was seen. Files waiting when the
station starts keep their mtime, so a station tells images written while it was away from new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from filo_line.sources.base import Frame, SourceError

log = logging.getLogger("filo.line.folder")

SUBFOLDERS = ("processing", "done", "failed")
MTIME_TRUST_S = 1.0


@dataclass
class _Candidate:
    """A file seen but not yet whole: `writing` once a write was seen (wait for its close)."""

    state: str  # "new" | "writing"
    size: int
    since: float  # time.time() of the last change seen
    backlog: bool = False  # waiting before the station started: its mtime is when it was whole


@dataclass(frozen=True)
class _Ready:
    path: Path
    acquired_at: float
    taken: bool = False  # already in processing/ (left there by a crash)


class _Events(FileSystemEventHandler):
    """watchdog's thread -> the station's event loop."""

    def __init__(self, source: FolderSource, loop: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self.loop = loop

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        dest = getattr(event, "dest_path", "") or ""
        with contextlib.suppress(RuntimeError):  # the loop closed while the observer stops
            self.loop.call_soon_threadsafe(self.source._on_event, event.event_type, os.fsdecode(event.src_path),
                                           os.fsdecode(dest))


def whole_at(path: Path, seen_at: float, backlog: bool) -> float:
    """When the file was whole: its mtime (the writer's last write, this machine's clock), unless that is more
    than `MTIME_TRUST_S` before it was seen or after it (a writer that set the time itself, a camera's clock);
    then when it was seen. A file waiting at start keeps its mtime however old: its part is past the gate."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return seen_at
    if backlog:
        return min(mtime, time.time())
    return mtime if seen_at - MTIME_TRUST_S <= mtime <= seen_at else seen_at


def take(path: Path, taken: Path) -> None:
    """Move a file into processing/. A hard link and an unlink rather than a rename: inotify reports a rename
    out of the folder as a move whose other half never comes, and watchdog holds every later event of the folder
    for half a second waiting for it. A crash between the two leaves the same file (one inode) in both places,
    which `start` undoes. Where the file system has no hard links, a rename."""
    try:
        os.link(path, taken)
    except FileNotFoundError:
        raise
    except OSError:
        os.rename(path, taken)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def unique_path(folder: Path, name: str) -> Path:
    """`folder/name`, or `folder/stem~N.suffix` when that is taken."""
    target = folder / name
    stem, suffix = os.path.splitext(name)
    n = 1
    while target.exists():
        target = folder / f"{stem}~{n}{suffix}"
        n += 1
    return target


class FolderSource:
    def __init__(self, path: str | os.PathLike[str], pattern: str = "*", settle_s: float = 0.5,
                 stale_writer_s: float = 30.0, sweep_s: float = 0.1) -> None:
        self.path = Path(path)
        self.pattern = pattern
        self.settle_s = settle_s
        self.stale_writer_s = stale_writer_s
        self.sweep_s = sweep_s
        self.processing = self.path / "processing"
        self.done = self.path / "done"
        self.failed = self.path / "failed"
        self._candidates: dict[Path, _Candidate] = {}
        self._queued: set[Path] = set()
        self._ready: asyncio.Queue[_Ready] | None = None
        self._observer: Observer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._sees_closes = False

    # --- lifecycle ---

    def _matches(self, path: Path) -> bool:
        return path.parent == self.path and fnmatch.fnmatch(path.name, self.pattern)

    async def start(self) -> None:
        if not self.path.is_dir():
            raise SourceError(f"folder {self.path} does not exist (or is not a folder)")
        try:
            for name in SUBFOLDERS:
                (self.path / name).mkdir(exist_ok=True)
        except OSError as exc:
            raise SourceError(f"folder {self.path}: cannot create processing/, done/, failed/ ({exc})") from None
        loop = asyncio.get_running_loop()
        self._ready = asyncio.Queue()
        observer = Observer()
        self._sees_closes = type(observer).__name__ == "InotifyObserver"
        observer.schedule(_Events(self, loop), str(self.path), recursive=False)
        observer.daemon = True
        try:
            observer.start()
        except OSError as exc:
            raise SourceError(f"folder {self.path}: cannot watch it ({exc})") from None
        self._observer = observer
        now = time.time()
        # taken before a crash and never finished: first, oldest first
        left = sorted((p for p in self.processing.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)
        taken_inodes = {p.stat().st_ino for p in left}
        for p in self.path.iterdir():  # a take that a crash cut between its link and its unlink
            if p.is_file() and p.stat().st_ino in taken_inodes:
                p.unlink()
        for p in left:
            self._ready.put_nowait(_Ready(p, min(p.stat().st_mtime, now), taken=True))
        for p in sorted(self.path.iterdir()):
            if p.is_file() and self._matches(p) and p not in self._candidates:
                with contextlib.suppress(FileNotFoundError):
                    self._candidates[p] = _Candidate("new", p.stat().st_size, now, backlog=True)
        self._sweeper = loop.create_task(self._sweep())
        log.info("watching %s for %s (%d left in processing/, %d waiting)", self.path, self.pattern, len(left),
                 len(self._candidates))

    @property
    def watching(self) -> bool:
        """Started: a file written from now on is seen as it arrives."""
        return self._observer is not None

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join, 5)
            self._observer = None

    async def check(self) -> str:
        if not self.path.is_dir():
            raise SourceError(f"folder {self.path} does not exist (or is not a folder)")
        if not os.access(self.path, os.R_OK | os.W_OK | os.X_OK):
            raise SourceError(f"folder {self.path}: not readable and writable by this user")
        waiting = sum(1 for p in self.path.iterdir() if p.is_file() and self._matches(p))
        taken = sum(1 for p in self.processing.iterdir()) if self.processing.is_dir() else 0
        return f"folder {self.path} ({self.pattern}): readable and writable, {waiting} waiting, {taken} in processing/"

    # --- what makes a file ready ---

    def _on_event(self, kind: str, src: str, dest: str) -> None:
        path = Path(src)
        if kind == "moved":
            self._candidates.pop(path, None)
            if dest and self._matches(Path(dest)):
                self._make_ready(Path(dest), time.time())
            return
        if not self._matches(path):
            return
        if kind == "created":
            self._candidates.setdefault(path, _Candidate("new", -1, time.time()))
        elif kind == "modified":
            if path not in self._queued:
                self._candidates[path] = _Candidate("writing", -1, time.time())
        elif kind == "closed":
            self._make_ready(path, time.time())
        elif kind == "deleted":
            self._candidates.pop(path, None)

    def _make_ready(self, path: Path, seen_at: float, backlog: bool = False) -> None:
        self._candidates.pop(path, None)
        if path in self._queued or self._ready is None:
            return
        self._queued.add(path)
        self._ready.put_nowait(_Ready(path, whole_at(path, seen_at, backlog)))

    async def _sweep(self) -> None:
        """Size stability for files no close will announce (moved in, waiting at start, no inotify)."""
        while True:
            await asyncio.sleep(self.sweep_s)
            now = time.time()
            ready: list[tuple[float, Path]] = []
            for path, c in list(self._candidates.items()):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    self._candidates.pop(path, None)
                    continue
                if st.st_size != c.size:
                    c.size, c.since = st.st_size, now  # changed (or first seen): quiet from now on
                    continue
                quiet = now - c.since
                if c.state == "writing" and self._sees_closes:
                    whole = quiet >= self.stale_writer_s  # its close will say; unless the writer died
                else:
                    whole = (quiet >= self.settle_s and c.size > 0) or quiet >= self.stale_writer_s
                if whole:
                    ready.append((min(st.st_mtime, now) if c.backlog else c.since, path, c.backlog))
            for seen_at, path, backlog in sorted(ready):
                self._make_ready(path, seen_at, backlog)

    # --- taking files ---

    def _take(self, item: _Ready) -> Frame | None:
        self._queued.discard(item.path)
        if item.taken:
            taken = item.path
        else:
            taken = unique_path(self.processing, item.path.name)
            try:
                take(item.path, taken)
            except FileNotFoundError:
                return None  # removed meanwhile
            except OSError as exc:
                log.error("cannot take %s (%s); left where it is", item.path, exc)
                return None
        read_error = None
        try:
            data = taken.read_bytes()
        except OSError as exc:
            data, read_error = b"", f"cannot be read: {exc.strerror or exc}"
        name = item.path.name
        return Frame(data=data, part_id=Path(name).stem, name=name, acquired_at=item.acquired_at,
                     finish=partial(self._finish, taken, read_error))

    def _finish(self, taken: Path, read_error: str | None, outcome: str, reason: str) -> None:
        folder = self.done if outcome == "done" else self.failed
        original = taken.name
        try:
            target = unique_path(folder, original)
            os.rename(taken, target)
            if outcome != "done":
                (folder / f"{target.name}.reason.txt").write_text((read_error or reason or "failed") + "\n")
        except OSError as exc:
            log.error("cannot move %s to %s/ (%s)", taken, folder.name, exc)

    async def _next(self, timeout_s: float | None) -> Frame:
        assert self._ready is not None, "start() first"
        while True:
            item = await asyncio.wait_for(self._ready.get(), timeout_s) if timeout_s is not None \
                else await self._ready.get()
            frame = await asyncio.to_thread(self._take, item)
            if frame is not None:
                return frame

    async def frames(self) -> AsyncIterator[Frame]:
        while True:
            yield await self._next(None)

    async def acquire(self, part_id: str, timeout_s: float) -> Frame:
        """The next whole file, for the part the PLC just triggered."""
        try:
            frame = await self._next(max(0.0, timeout_s))
        except asyncio.TimeoutError:
            raise TimeoutError(f"no file in {self.path} within {timeout_s * 1000:.0f} ms") from None
        frame.part_id = part_id
        return frame
