"""The transport a PLC handshake runs over: named boolean signals and the part id, whatever the protocol.

Signals the connector writes: `trigger_ready`, `result_ready`, `ok`, `ng`, `error`; signals it reads: `trigger`,
`ack`. The part id is read (the PLC's serial, when it triggers) and written (with each result). OPC UA maps each
to a node id, Modbus TCP each signal to a coil and the part id to holding registers.
"""

from __future__ import annotations

from typing import Protocol

WRITTEN_SIGNALS = ("trigger_ready", "result_ready", "ok", "ng", "error")
READ_SIGNALS = ("trigger", "ack")


class PlcError(RuntimeError):
    """The PLC cannot be reached or refused a read or write; the connector reconnects with backoff."""


class PlcIO(Protocol):
    @property
    def connected(self) -> bool: ...

    async def connect(self) -> None:
        """Connect (raises PlcError with the endpoint and the reason)."""
        ...

    async def close(self) -> None: ...

    async def read_bool(self, signal: str) -> bool:
        """One of READ_SIGNALS; raises PlcError."""
        ...

    async def write_bools(self, values: dict[str, bool]) -> None:
        """Some of WRITTEN_SIGNALS, written together (in one request where the protocol allows); raises PlcError."""
        ...

    async def read_part_id(self) -> str: ...

    async def write_part_id(self, part_id: str) -> None: ...

    async def check(self) -> str:
        """One line for `filo line --check`: the endpoint reached and every configured signal read once."""
        ...
