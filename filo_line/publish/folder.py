"""Each part's image copied into a folder by what happened to it: `ok/`, `ng/`, `timeout/`, `error/`.

The copy is the image as the station had it, under its own name (the request id's tail is added where a name is
already taken). A late verdict from the spool copies the image again, as `late-<name>`, into `ok/` or `ng/`: the
first copy says what the line did, the second what the service found afterwards. Copies are written to a
temporary name and renamed, so a folder never shows half an image.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from filo_line.decision import VERDICT_LABELS
from filo_line.publish.base import Item, QueuedDelivery
from filo_line.report import PartReport


class FolderPublisher:
    kind = "folder"

    def __init__(self, path: str | os.PathLike[str], capacity: int = 1_000,
                 on_drop: Callable[[], None] | None = None) -> None:
        self.path = Path(path)
        self.target = str(self.path)
        self._queue = QueuedDelivery(f"folder-{self.path.name}", self._deliver, capacity, on_drop=on_drop)

    @property
    def connected(self) -> None:
        return None

    @property
    def dropped(self) -> int:
        return self._queue.dropped

    def start(self) -> None:
        for verdict in VERDICT_LABELS:
            (self.path / verdict).mkdir(parents=True, exist_ok=True)
        self._queue.start()

    def publish(self, report: PartReport, image: bytes | None) -> None:
        if image:
            self._queue.put((report, image))

    def _deliver(self, item: Item) -> bool:
        report, image = item
        assert image is not None
        folder = self.path / report.verdict
        name = Path(report.image_name).name or f"{report.part_id}.img"
        if report.late:
            name = f"late-{name}"
        target = folder / name
        if target.exists():
            stem, suffix = os.path.splitext(name)
            target = folder / f"{stem}.{report.request_id[-8:]}{suffix}"
        tmp = folder / f".{target.name}.tmp"
        tmp.write_bytes(image)
        os.replace(tmp, target)
        return True

    def stop(self, flush_s: float = 2.0) -> None:
        self._queue.stop(flush_s)

    def check(self, timeout_s: float = 5.0) -> str:
        for verdict in VERDICT_LABELS:
            (self.path / verdict).mkdir(parents=True, exist_ok=True)
        probe = self.path / f".check-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        return f"{self.path}: writable (ok/, ng/, timeout/, error/)"
