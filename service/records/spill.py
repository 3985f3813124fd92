"""Records a stopping process could not hand on, kept on the local disk until the next start replays them.

A graceful stop writes what is left in the buffer to its target while it may (the database, or in queue mode
the Redis stream past its cap); what still could not be written lands here, under the state directory
(`records-spill/`), one owner-only file per record named by its id. Writing a record twice is writing one
file, so a replay never duplicates, and a record's file is removed only after its target took it: a process
that dies while replaying leaves the rest for the next start.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path

from service.core.files import write_private
from service.records.model import REQUEST_ID_PATTERN, InspectionRecord

log = logging.getLogger(__name__)
SUFFIX = ".record"


class RecordSpill:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, record_id: str) -> Path:
        if not re.fullmatch(REQUEST_ID_PATTERN, record_id):  # every id is one; never a path of another shape
            raise ValueError(f"not a record id: {record_id!r}")
        return self.directory / f"{record_id}{SUFFIX}"

    def write(self, records: list[InspectionRecord]) -> int:
        """Keep `records` (their artefacts too); returns how many were kept. Never raises: a record that
        cannot be kept is logged as lost."""
        kept = 0
        for record in records:
            try:
                wire = {k: base64.b64encode(v).decode("ascii") for k, v in record.to_wire().items()}
                write_private(self._path(record.id), json.dumps(wire).encode(), prefix=".spill-")
                kept += 1
            except (OSError, ValueError) as exc:
                log.error("record %s lost: it could not be written to %s either (%s)", record.id, self.directory, exc)
        return kept

    def load(self) -> list[InspectionRecord]:
        """Every kept record, oldest first; a file that cannot be read is renamed `*.unreadable` and logged."""
        if not self.directory.is_dir():
            return []
        records = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime_ns):
            try:
                wire = json.loads(path.read_bytes())
                records.append(InspectionRecord.from_wire({k.encode(): base64.b64decode(v) for k, v in wire.items()}))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("spilled record %s is unreadable, set aside: %s", path, exc)
                path.rename(path.with_suffix(".unreadable"))
        return records

    def remove(self, records: list[InspectionRecord]) -> None:
        for record in records:
            self._path(record.id).unlink(missing_ok=True)
