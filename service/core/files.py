"""State files the service creates are its own: owner-only files (0600) in owner-only directories (0700).

The state directory holds every kept image (records.db), the category catalog, references and drafts: none of
it is for the other users of the machine. The modes are set at creation, whatever the process's umask; a
directory or file that already exists keeps the mode its owner gave it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """`path` as a directory; each missing part of it is created owner-only (0700)."""
    path = Path(path)
    missing = []
    for part in (path, *path.parents):
        if part.is_dir():
            break
        missing.append(part)
    for part in reversed(missing):
        try:
            part.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made meanwhile by another process: theirs, as it is
            continue
        os.chmod(part, DIR_MODE)  # the umask may only have taken bits away; this says it outright
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty and owner-only (0600) unless it exists (what SQLite then opens, and its -wal and
    -shm files take the database file's mode)."""
    path = Path(path)
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return path
    os.close(fd)
    os.chmod(path, FILE_MODE)
    return path


def write_private(path: Path, data: bytes, prefix: str = ".tmp-") -> None:
    """Write `data` to `path` atomically (a temporary file beside it, then a rename), owner-only."""
    path = Path(path)
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
