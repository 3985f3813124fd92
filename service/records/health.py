"""Why records are not being written: one short cause per failed write, for the log, the metric
`filo_records_write_failures_total{cause}` and `/readyz` (`detail.records`)."""

from __future__ import annotations

import errno
import sqlite3

from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

SQLITE_FULL = 13
SQLITE_IOERR = 10


class WriteRefused(RuntimeError):
    """A target that refuses a write for a reason of its own names it (`cause`)."""

    cause = "refused"


class NotMigrated(WriteRefused):
    cause = "not_migrated"


def write_failure_cause(exc: BaseException) -> str:
    """`disk_full`, `locked`, `io_error`, `unreachable`, `rejected` (the database refused the data),
    `not_migrated`, `stream_full`, `redis_unavailable`, or `error` for anything else."""
    if isinstance(exc, WriteRefused):
        return exc.cause
    if type(exc).__module__.startswith("redis"):
        return "redis_unavailable"
    if isinstance(exc, IntegrityError):
        return "rejected"
    if isinstance(exc, DBAPIError):
        orig = exc.orig
        if isinstance(orig, sqlite3.Error):
            code = getattr(orig, "sqlite_errorcode", None)
            text = str(orig).lower()
            if code == SQLITE_FULL or "full" in text:
                return "disk_full"
            if "locked" in text or "busy" in text:
                return "locked"
            if (code is not None and code & 0xFF == SQLITE_IOERR) or "i/o" in text:
                return "io_error"
            return "error"
        if isinstance(exc, OperationalError) or exc.connection_invalidated:
            return "unreachable"
        return "rejected"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return "unreachable"
    if isinstance(exc, OSError):
        return "disk_full" if exc.errno == errno.ENOSPC else "io_error"
    return "error"
