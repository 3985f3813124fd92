"""The one interface every image source of a station implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Frame:
    """One image of one part, as the source delivers it."""

    data: bytes  # the encoded image: the file's bytes (folder), PNG (camera)
    part_id: str  # the file's stem, the camera's frame id, or the PLC's part id when it triggered the part
    name: str  # a file name for the image: the file's own, or f"{part_id}.png" for a camera frame
    acquired_at: float  # time.time() when the source had the image whole
    # called once the part is finished: outcome "done" or "failed" with a reason (a folder source moves the file
    # to done/ or failed/ then); None where the source keeps nothing
    finish: Callable[[str, str], None] | None = field(default=None, repr=False)


class SourceError(RuntimeError):
    """The source cannot deliver (camera gone, folder unreadable); the message says what to check."""


class Source(Protocol):
    async def start(self) -> None:
        """Open the camera or start watching the folder; raises SourceError with a clear reason."""
        ...

    async def stop(self) -> None: ...

    def frames(self) -> AsyncIterator[Frame]:
        """Untriggered stations: every image as it arrives (a file fully written, a free-running or
        hardware-triggered camera frame), in arrival order, forever."""
        ...

    async def acquire(self, part_id: str, timeout_s: float) -> Frame:
        """PLC-triggered stations: the image of the part the PLC just triggered (a software trigger for a
        camera, the next file for a folder), within `timeout_s`; raises TimeoutError or SourceError."""
        ...

    async def check(self) -> str:
        """One line for `filo line --check`: what was reached and how (raises SourceError when it is not)."""
        ...
