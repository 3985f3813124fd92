"""The PLC handshake's transport over OPC UA: each signal and the part id are variable nodes of the PLC's server,
read and written through asyncua's client.

The connector never subscribes: it polls the two signals it reads, because a poll every few milliseconds over a
session that is already open is cheaper to reason about (and to bound) than a subscription's publishing interval,
queue and keep-alive, and it behaves the same on every PLC's server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from filo_line.plc.base import READ_SIGNALS, WRITTEN_SIGNALS, PlcError

log = logging.getLogger(__name__)

NODE_KEYS = (*WRITTEN_SIGNALS, *READ_SIGNALS, "part_id")

# Status codes that refuse one node's read or write while the session itself stays good; any other failure ends
# the session (the handshake then reconnects)
_NODE_REFUSALS = frozenset({
    "BadNodeIdUnknown", "BadNodeIdInvalid", "BadAttributeIdInvalid", "BadTypeMismatch", "BadNotWritable",
    "BadNotReadable", "BadUserAccessDenied", "BadOutOfRange", "BadWriteNotSupported", "BadIndexRangeInvalid",
})

# OPC UA's integer types: a PLC whose part id is a serial number (DINT, UDINT, ...) gets it written as one
_INTEGER_TYPES = ("SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64")


class OpcUaIO:
    """PlcIO over one OPC UA session: `nodes` maps each signal name (and `part_id`) to the node id the PLC's program
    uses, e.g. {"trigger": "ns=2;s=Cam1.Trigger", ...}. A signal without a node is simply not used by this station
    (an untriggered station needs no Trigger); using it anyway is a PlcError naming it.

    Values are written without timestamps: several PLC servers (Siemens S7-1500 among them) refuse a write that
    carries a source timestamp.
    """

    def __init__(self, endpoint: str, nodes: dict[str, str], timeout_s: float = 2.0) -> None:
        from asyncua import ua

        unknown = sorted(set(nodes) - set(NODE_KEYS))
        if unknown:
            raise ValueError(f"unknown OPC UA node keys {unknown}; known: {list(NODE_KEYS)}")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._node_ids: dict[str, Any] = {}
        for key, text in nodes.items():
            try:
                self._node_ids[key] = ua.NodeId.from_string(text)
            except Exception as exc:
                raise ValueError(f"node {key}: {text!r} is not an OPC UA node id (like 'ns=2;s=Cam1.Trigger')") from exc
        self._texts = dict(nodes)
        self.signals = frozenset(nodes)  # the signals (and part_id) this station has a node for
        self._client: Any = None
        self._failed = False
        self._part_id_type: Any = None  # the PartId node's variant type, read on the first write of each session

    @property
    def connected(self) -> bool:
        from asyncua.client.ua_client import UaClientState

        return (self._client is not None and not self._failed
                and self._client.uaclient.state is UaClientState.CONNECTED)

    async def connect(self) -> None:
        from asyncua import Client

        await self.close()
        client = Client(self.endpoint, timeout=self.timeout_s)
        try:
            await asyncio.wait_for(client.connect(), self.timeout_s)
        except Exception as exc:
            client.disconnect_socket()
            raise PlcError(f"OPC UA {self.endpoint}: cannot connect ({_reason(exc)})") from exc
        self._client = client
        self._failed = False
        self._part_id_type = None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await asyncio.wait_for(client.disconnect(), self.timeout_s)
        except Exception:  # the server may already be gone: nothing to close then
            client.disconnect_socket()

    async def read_bool(self, signal: str) -> bool:
        if signal not in READ_SIGNALS:
            raise ValueError(f"{signal} is not a signal the connector reads ({READ_SIGNALS})")
        value = await self._read_value(signal)
        if not isinstance(value, (bool, int)):
            raise PlcError(f"OPC UA {self.endpoint}: node {signal} ({self._texts[signal]}) holds "
                           f"{type(value).__name__} {value!r}, not a Boolean")
        return bool(value)

    async def write_bools(self, values: dict[str, bool]) -> None:
        from asyncua import ua

        for signal in values:
            if signal not in WRITTEN_SIGNALS:
                raise ValueError(f"{signal} is not a signal the connector writes ({WRITTEN_SIGNALS})")
        nodes = [self._node(signal) for signal in values]
        data = [ua.DataValue(ua.Variant(bool(v), ua.VariantType.Boolean)) for v in values.values()]
        await self._call(f"write {', '.join(values)}", self._session().write_values(nodes, data))

    async def read_part_id(self) -> str:
        value = await self._read_value("part_id")
        if value is None:
            return ""
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace").rstrip("\x00")
        return str(value)

    async def write_part_id(self, part_id: str) -> None:
        from asyncua import ua

        node = self._node("part_id")
        if self._part_id_type is None:
            self._part_id_type = await self._call("read PartId's data type", node.read_data_type_as_variant_type())
        kind = self._part_id_type
        if kind.name in _INTEGER_TYPES:
            try:
                value: Any = int(part_id or 0)
            except ValueError as exc:
                raise PlcError(f"OPC UA {self.endpoint}: part id {part_id!r} does not fit the PartId node "
                               f"({self._texts['part_id']}), which is {kind.name}") from exc
        elif kind == ua.VariantType.ByteString:
            value = part_id.encode()
        else:
            kind, value = ua.VariantType.String, part_id
        await self._call("write PartId", self._session().write_values([node], [ua.DataValue(ua.Variant(value, kind))]))

    async def check(self) -> str:
        """Reads every configured node in one request; a node the server does not know is named with its id."""
        from asyncua import ua

        opened = not self.connected
        if opened:
            await self.connect()
        try:
            keys = list(self._node_ids)
            results = await self._call("read every node", self._session().uaclient.read_attributes(
                [self._node_ids[k] for k in keys], ua.AttributeIds.Value))
            bad = [f"{k} ({self._texts[k]}): {r.StatusCode.name}" for k, r in zip(keys, results)
                   if r.StatusCode is not None and not r.StatusCode.is_good()]
            if bad:
                raise PlcError(f"OPC UA {self.endpoint}: " + "; ".join(bad))
            return f"OPC UA {self.endpoint}: connected, {len(keys)} nodes read ({', '.join(keys)})"
        finally:
            if opened:
                await self.close()

    # --- internals

    def _session(self) -> Any:
        if self._client is None or not self.connected:
            raise PlcError(f"OPC UA {self.endpoint}: not connected")
        return self._client

    def _node(self, key: str) -> Any:
        if key not in self._node_ids:
            raise PlcError(f"OPC UA {self.endpoint}: no node is configured for {key}")
        return self._session().get_node(self._node_ids[key])

    async def _read_value(self, key: str) -> Any:
        from asyncua import ua

        node = self._node(key)
        (result,) = await self._call(f"read {key}", self._session().uaclient.read_attributes(
            [node.nodeid], ua.AttributeIds.Value))
        if result.StatusCode is not None and not result.StatusCode.is_good():
            raise PlcError(f"OPC UA {self.endpoint}: node {key} ({self._texts[key]}): {result.StatusCode.name}")
        return result.Value.Value if result.Value is not None else None

    async def _call(self, what: str, request: Any) -> Any:
        """Awaits one request, bounded by timeout_s; any failure is a PlcError, and one of the transport (not a
        refusal of the server for one node) marks the session failed so that the handshake reconnects."""
        from asyncua import ua

        try:
            return await asyncio.wait_for(request, self.timeout_s)
        except ua.UaStatusCodeError as exc:
            if ua.StatusCode(exc.code).name not in _NODE_REFUSALS:
                self._failed = True
            raise PlcError(f"OPC UA {self.endpoint}: {what} refused ({_reason(exc)})") from exc
        except Exception as exc:
            self._failed = True
            raise PlcError(f"OPC UA {self.endpoint}: {what} failed ({_reason(exc)})") from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
