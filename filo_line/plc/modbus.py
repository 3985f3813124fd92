"""The PLC handshake's transport over Modbus TCP: the connector is the client, the PLC the server. Each signal is a
coil; the part id is ASCII text in a run of holding registers.

Part id encoding: two characters per register, the first in the high byte (big-endian, as Modbus sends every
register), padded with NUL bytes up to `part_id_registers` registers; reading stops at the first NUL and drops surrounding
spaces (PLC strings are often space-padded). A part id
longer than the registers hold is cut to fit (and logged), because the result must still reach the PLC; characters
outside ASCII are written as '?'.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from filo_line.plc.base import READ_SIGNALS, WRITTEN_SIGNALS, PlcError

log = logging.getLogger(__name__)

COIL_KEYS = (*WRITTEN_SIGNALS, *READ_SIGNALS)


def encode_part_id(part_id: str, registers: int) -> list[int]:
    """The holding register values that carry `part_id`: 2 ASCII characters per register, big-endian, NUL-padded."""
    raw = part_id.encode("ascii", errors="replace")[: registers * 2].ljust(registers * 2, b"\x00")
    return [(raw[i] << 8) | raw[i + 1] for i in range(0, len(raw), 2)]


def decode_part_id(values: list[int]) -> str:
    """The text in holding register values written by `encode_part_id` (or by the PLC the same way)."""
    raw = b"".join(int(v & 0xFFFF).to_bytes(2, "big") for v in values)
    return raw.split(b"\x00", 1)[0].decode("ascii", errors="replace").strip()


def contiguous_runs(addresses: dict[int, bool]) -> list[tuple[int, list[bool]]]:
    """Coil writes grouped into runs of consecutive addresses, each run one Modbus request (function 15), so that
    signals the PLC programmer placed side by side change in the same request."""
    runs: list[tuple[int, list[bool]]] = []
    for address in sorted(addresses):
        if runs and runs[-1][0] + len(runs[-1][1]) == address:
            runs[-1][1].append(addresses[address])
        else:
            runs.append((address, [addresses[address]]))
    return runs


class ModbusIO:
    """PlcIO over one Modbus TCP connection to the PLC (the server) at host:port, addressing device `unit`.

    `coils` maps signal names to coil addresses (0-based, as in the request); a signal without a coil is not used
    by this station. The client never reconnects on its own (pymodbus' reconnect is off): the handshake decides
    when and how often, so that the state it reports is the state there is.
    """

    def __init__(self, host: str, port: int, unit: int, coils: dict[str, int], part_id_register: int,
                 part_id_registers: int = 10, timeout_s: float = 2.0) -> None:
        unknown = sorted(set(coils) - set(COIL_KEYS))
        if unknown:
            raise ValueError(f"unknown Modbus coil keys {unknown}; known: {list(COIL_KEYS)}")
        if part_id_registers < 1:
            raise ValueError("part_id_registers must be at least 1")
        self.host, self.port, self.unit = host, port, unit
        self.coils = dict(coils)
        self.signals = frozenset(coils)  # the signals this station has a coil for
        self.part_id_register = part_id_register
        self.part_id_registers = part_id_registers
        self.timeout_s = timeout_s
        self._client: Any = None
        self._failed = False

    @property
    def endpoint(self) -> str:
        return f"modbus://{self.host}:{self.port} unit {self.unit}"

    @property
    def connected(self) -> bool:
        return self._client is not None and not self._failed and bool(self._client.connected)

    async def connect(self) -> None:
        from pymodbus.client import AsyncModbusTcpClient

        await self.close()
        client = AsyncModbusTcpClient(self.host, port=self.port, timeout=self.timeout_s, retries=0, reconnect_delay=0)
        try:
            ok = await asyncio.wait_for(client.connect(), self.timeout_s + 1)
        except Exception as exc:
            client.close()
            raise PlcError(f"Modbus {self.endpoint}: cannot connect ({type(exc).__name__}: {exc})") from exc
        if not ok:
            client.close()
            raise PlcError(f"Modbus {self.endpoint}: cannot connect (refused or unreachable)")
        self._client = client
        self._failed = False

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def read_bool(self, signal: str) -> bool:
        if signal not in READ_SIGNALS:
            raise ValueError(f"{signal} is not a signal the connector reads ({READ_SIGNALS})")
        address = self._coil(signal)
        reply = await self._call(f"read coil {address} ({signal})",
                                 lambda c: c.read_coils(address, count=1, device_id=self.unit))
        return bool(reply.bits[0])

    async def write_bools(self, values: dict[str, bool]) -> None:
        for signal in values:
            if signal not in WRITTEN_SIGNALS:
                raise ValueError(f"{signal} is not a signal the connector writes ({WRITTEN_SIGNALS})")
        by_address = {self._coil(signal): bool(v) for signal, v in values.items()}
        for start, bits in contiguous_runs(by_address):
            if len(bits) == 1:
                await self._call(f"write coil {start}",
                                 lambda c, a=start, b=bits[0]: c.write_coil(a, b, device_id=self.unit))
            else:
                await self._call(f"write coils {start}..{start + len(bits) - 1}",
                                 lambda c, a=start, b=bits: c.write_coils(a, b, device_id=self.unit))

    async def read_part_id(self) -> str:
        reply = await self._call(self._registers_text("read"), lambda c: c.read_holding_registers(
            self.part_id_register, count=self.part_id_registers, device_id=self.unit))
        return decode_part_id(list(reply.registers))

    async def write_part_id(self, part_id: str) -> None:
        if len(part_id) > self.part_id_registers * 2:
            log.warning("part id %r is longer than %d registers hold: the PLC gets %r", part_id,
                        self.part_id_registers, part_id[: self.part_id_registers * 2])
        values = encode_part_id(part_id, self.part_id_registers)
        await self._call(self._registers_text("write"), lambda c: c.write_registers(
            self.part_id_register, values, device_id=self.unit))

    async def check(self) -> str:
        """Reads every configured coil and the part id registers once; a refused address is named with its signal."""
        opened = not self.connected
        if opened:
            await self.connect()
        try:
            for signal, address in self.coils.items():
                await self._call(f"read coil {address} ({signal})",
                                 lambda c, a=address: c.read_coils(a, count=1, device_id=self.unit))
            await self.read_part_id()
            return (f"Modbus {self.endpoint}: connected, {len(self.coils)} coils and "
                    f"{self.part_id_registers} part id registers read")
        finally:
            if opened:
                await self.close()

    # --- internals

    def _coil(self, signal: str) -> int:
        if signal not in self.coils:
            raise PlcError(f"Modbus {self.endpoint}: no coil is configured for {signal}")
        return self.coils[signal]

    def _registers_text(self, verb: str) -> str:
        last = self.part_id_register + self.part_id_registers - 1
        return f"{verb} part id holding registers {self.part_id_register}..{last}"

    async def _call(self, what: str, request: Any) -> Any:
        """One request, bounded by timeout_s. An exception reply (bad address, unknown unit) is the PLC refusing
        and leaves the connection up; no reply or a broken connection marks it failed so the handshake reconnects."""
        if not self.connected:
            raise PlcError(f"Modbus {self.endpoint}: not connected")
        try:
            reply = await asyncio.wait_for(request(self._client), self.timeout_s + 1)
        except Exception as exc:
            self._failed = True
            raise PlcError(f"Modbus {self.endpoint}: {what} failed ({type(exc).__name__}: {exc})") from exc
        if reply.isError():
            code = getattr(reply, "exception_code", None)
            raise PlcError(f"Modbus {self.endpoint}: {what} refused ({_exception_name(code)})")
        return reply


def _exception_name(code: int | None) -> str:
    names = {1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "device failure",
             6: "device busy", 10: "gateway path unavailable", 11: "gateway target did not respond"}
    return f"exception {code}: {names.get(code or 0, 'unknown')}"
