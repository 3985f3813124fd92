"""Redis Streams protocol between API processes and inspection workers: what both sides share.

The API side (enqueue, await the reply, count workers) is service/queue/producer.py, the worker side
(read, claim, reply-and-acknowledge, heartbeat) service/queue/consumer.py; Redis key names are
service/core/keys.py. This module holds the wire format: the stream entry (`Job` as written, `Entry`
as read), the reply (`Reply`), the result summary it carries, and the group and clock helpers.

Design (see also service/worker/loop.py):

* Request path. The API XADDs one entry per request to `settings.stream` (fields: request id,
  reply key, timeout in ms, JSON params, the original image bytes) through a Lua script that, in
  one atomic step, refuses unknown categories and refuses when the stream already holds
  `queue_max_depth` entries (-> 429). Workers read with XREADGROUP in the consumer group
  `settings.consumer_group`, so each entry goes to exactly one worker at a time.
* Reply path. Every request has its own reply list `<stream>:reply:<request id>`. The worker
  LPUSHes the reply, sets the list's expiry, XACKs and XDELs the entry in ONE MULTI/EXEC
  transaction, and the API BLPOPs that list. A list (unlike pub/sub) keeps the reply even if the
  API starts waiting after the worker answered, so no reply is lost; a reply nobody collects
  (the caller gave up) expires after `request_timeout_s + 60` s. A duplicate reply (an entry
  reclaimed from a worker that was only slow) is harmless: both answer the same request, whose id
  is unique (a fresh uuid4 per request), the API takes one and the other expires unread.
* Deadlines use Redis' clock only: an entry's ID is the server's millisecond time at XADD, so
  `deadline = id_ms + timeout_ms` is compared with the server's TIME, never a pod's clock.
* Heartbeats. Each worker writes the server's time into the zset `<stream>:workers` every
  `heartbeat_interval_ms`; one whose entry is older than `heartbeat_ttl_ms` is dead. API pods count
  only live workers (readiness, `filo_workers`, the enqueue script's no-worker refusal).
* Claiming. Entries read but not acknowledged stay in the group's pending list. A worker that
  dies leaves them there. The other workers look for lapsed heartbeats a few times per interval
  and, in one Lua step (consumer.py), XCLAIM the dead consumer's pending entries (XPENDING for that
  consumer) and, once it holds nothing, XGROUP DELCONSUMER it and drop its heartbeat: the step is
  atomic, so of two survivors racing only one takes each entry, and XCLAIM's min-idle (one heartbeat
  interval) leaves alone what a worker that is alive after all has just read. As the backstop,
  workers XAUTOCLAIM any entry idle longer than `claim_idle_ms`. A live worker with a long batch
  resets its entries' idle time (XCLAIM ... JUSTID) so they are not stolen. Each delivery counts;
  an entry delivered more than `max_deliveries` times (it keeps killing workers) is answered
  `poison_request` and acknowledged instead of being run.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from service.core.imaging import Heatmap, dequantize_map, quantize_map
from service.core.keys import Keys
from service.core.types import AnomalyType, Box, InspectResult

# --- payloads ------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One request as it travels through the stream."""

    request_id: str
    category: str
    image: bytes
    timeout_ms: int
    top_k: int
    grounding: bool | None = None
    want_map: bool = False  # the map itself in the reply (compact, see Reply); the service path never needs it
    heatmap: dict[str, Any] | None = None  # HeatmapSpec.as_dict(): the worker renders it; None: no heatmap
    map_encoding: str = "uint8"  # with want_map: a key of MAP_ENCODINGS

    def fields(self, reply_key: str) -> dict[str, Any]:
        params = {"category": self.category, "top_k": self.top_k, "grounding": self.grounding,
                  "want_map": self.want_map, "heatmap": self.heatmap, "map_encoding": self.map_encoding}
        return {"id": self.request_id, "reply": reply_key, "timeout_ms": str(self.timeout_ms),
                "params": json.dumps(params), "image": self.image}


@dataclass
class Entry:
    """A stream entry as a worker sees it; `deliveries` counts this delivery too."""

    entry_id: str
    request_id: str
    reply_key: str | None
    timeout_ms: int
    params: dict[str, Any]
    image: bytes
    deliveries: int = 1
    malformed: str | None = None

    @property
    def enqueued_ms(self) -> int:
        return int(self.entry_id.split("-")[0])

    @property
    def deadline_ms(self) -> int:
        return self.enqueued_ms + self.timeout_ms

    @classmethod
    def parse(cls, entry_id: bytes | str, fields: dict[bytes, bytes]) -> Entry:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        try:
            return cls(
                entry_id=eid,
                request_id=fields[b"id"].decode(),
                reply_key=fields[b"reply"].decode(),
                timeout_ms=int(fields[b"timeout_ms"]),
                params=json.loads(fields[b"params"]),
                image=fields[b"image"],
            )
        except (KeyError, ValueError, TypeError) as exc:
            reply = fields.get(b"reply")
            return cls(eid, (fields.get(b"id") or b"?").decode(errors="replace"),
                       reply.decode(errors="replace") if reply else None, 0, {}, b"",
                       malformed=f"malformed stream entry: {type(exc).__name__}: {exc}")


# How a map may travel from a worker: (numpy dtype, encode, decode). uint8 is `round(255 * clip(m, 0, 1))`,
# within 1/510 of every value in [0, 1] (FiLo's maps are); float16 is within 2**-12 there.
MAP_ENCODINGS: dict[str, tuple[str, Any, Any]] = {
    "uint8": ("uint8", quantize_map, dequantize_map),
    "float16": ("float16", lambda m: m.astype(np.float16), lambda a: a.astype(np.float32)),
    "float32": ("float32", lambda m: m.astype(np.float32, copy=False), lambda a: a.copy()),
}
MAP_ERROR_BOUND = {"uint8": 1.0 / 510.0, "float16": 2.0 ** -12, "float32": 0.0}


@dataclass
class Reply:
    """A worker's answer to one request: a result summary, the rendered heatmap, the map (compact), or an error."""

    request_id: str
    error: dict[str, Any] | None = None  # code, message, status
    result: dict[str, Any] | None = None  # InspectResult fields without the map
    model: dict[str, Any] = field(default_factory=dict)
    queue_wait_ms: float = 0.0
    model_ms: float = 0.0
    anomaly_map: np.ndarray | None = None
    map_encoding: str = "uint8"
    heatmap: Heatmap | None = None

    def encode(self) -> bytes:
        """4-byte header length, JSON header, then the heatmap's bytes and the encoded map (if any)."""
        header: dict[str, Any] = {
            "request_id": self.request_id, "error": self.error, "result": self.result, "model": self.model,
            "queue_wait_ms": self.queue_wait_ms, "model_ms": self.model_ms, "map_shape": None,
            "heatmap": None,
        }
        blobs = []
        if self.heatmap is not None:
            header["heatmap"] = {**self.heatmap.meta(), "length": len(self.heatmap.data)}
            blobs.append(self.heatmap.data)
        if self.anomaly_map is not None:
            dtype, encode, _ = MAP_ENCODINGS[self.map_encoding]
            arr = np.ascontiguousarray(encode(self.anomaly_map), dtype=dtype)
            header["map_shape"], header["map_dtype"] = list(arr.shape), self.map_encoding
            blobs.append(arr.tobytes())
        raw = json.dumps(header).encode()
        return b"".join([struct.pack(">I", len(raw)), raw, *blobs])

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        (n,) = struct.unpack(">I", data[:4])
        header = json.loads(data[4:4 + n])
        offset = 4 + n
        heatmap = None
        if header.get("heatmap"):
            meta = dict(header["heatmap"])
            length = int(meta.pop("length"))
            heatmap = Heatmap(data=data[offset:offset + length], **meta)
            offset += length
        amap, encoding = None, header.get("map_dtype", "float32")  # float32: replies of older workers
        if header.get("map_shape"):
            dtype, _, decode = MAP_ENCODINGS[encoding]
            amap = decode(np.frombuffer(data[offset:], dtype=dtype).reshape(header["map_shape"]))
        return cls(header["request_id"], header.get("error"), header.get("result"), header.get("model") or {},
                   float(header.get("queue_wait_ms", 0.0)), float(header.get("model_ms", 0.0)), amap, encoding,
                   heatmap)


def error_dict(code: str, message: str, status: int) -> dict[str, Any]:
    return {"code": code, "message": message, "status": status}


# --- both sides ---------------------------------------------------------------------------------------


async def ensure_group(redis: Redis, keys: Keys) -> None:
    """Create the stream and its consumer group (from the start, so nothing added earlier is missed)."""
    try:
        await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def server_time_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


# --- InspectResult <-> JSON (the map travels separately: see Reply) ------------------------------------


def result_to_dict(result: InspectResult) -> dict[str, Any]:
    return {
        "score": float(result.score),
        "text_score": float(result.text_score),
        "map_max": float(result.map_max),
        "position": result.position,
        "boxes": [asdict(b) for b in result.boxes],
        "top_types": [asdict(t) for t in result.top_types],
        "timing_ms": dict(result.timing_ms),
        "references": int(result.references),
        "threshold": result.threshold,
        "threshold_source": result.threshold_source,
        "review_margin": float(result.review_margin),
        "is_anomalous": bool(result.is_anomalous),
        "needs_review": bool(result.needs_review),
    }


def result_from_dict(data: dict[str, Any], anomaly_map: np.ndarray | None) -> InspectResult:
    boxes = [Box(**{**b, "frame": tuple(b["frame"])}) for b in data.get("boxes", [])]
    return InspectResult(
        score=float(data["score"]),
        text_score=float(data.get("text_score", 0.0)),
        map_max=float(data.get("map_max", 0.0)),
        anomaly_map=anomaly_map if anomaly_map is not None else np.zeros((0, 0), np.float32),
        position=data.get("position"),
        boxes=boxes,
        top_types=[AnomalyType(**t) for t in data.get("top_types", [])],
        timing_ms=dict(data.get("timing_ms", {})),
        references=int(data.get("references", 0)),
        threshold=data.get("threshold"),
        threshold_source=str(data.get("threshold_source", "default")),
        review_margin=float(data.get("review_margin") or 0.0),
        is_anomalous=bool(data.get("is_anomalous", False)),
        needs_review=bool(data.get("needs_review", False)),
    )
