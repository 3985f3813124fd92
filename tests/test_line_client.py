"""The HTTP client's typed outcomes, against a loopback server answering what the service answers when it is
busy, away, refusing or slow (the real service's verdicts are in tests/test_line_station.py)."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import pytest

from filo_line.client import Failure, ServiceClient, ServiceError, Verdict, request_id_for, sanitise_part_id
from tests.service_fixtures import free_port

ANSWERS: dict[str, tuple[int, dict, dict]] = {
    "ok": (200, {}, {"request_id": "r1", "score": 0.7, "is_anomalous": True, "needs_review": False,
                     "threshold": 0.5, "boxes": [{"x1": 1, "y1": 2, "x2": 3, "y2": 4, "phrase": "crack",
                                                  "confidence": 0.9, "valid": True}],
                     "top_types": [{"description": "crack", "similarity": 0.3}]}),
    "busy": (429, {"Retry-After": "2"}, {"error": {"code": "queue_full", "message": "the queue is full"}}),
    "away": (503, {"Retry-After": "1"}, {"error": {"code": "not_ready", "message": "loading"}}),
    "late": (504, {}, {"error": {"code": "deadline_exceeded", "message": "not started in time"}}),
    "bad": (422, {}, {"error": {"code": "invalid_image", "message": "truncated image"}}),
    "nope": (404, {}, {"error": {"code": "unknown_category", "message": "unknown category 'nope'"}}),
    "boom": (500, {}, {"error": {"code": "inspection_failed", "message": "the model failed"}}),
}


class _Stub(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, str]]] = []

    def _answer(self, status: int, headers: dict, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(raw)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that stopped waiting
            self.wfile.write(raw)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode("latin-1")
        fields = dict(re.findall(r'name="(\w+)"\r\n\r\n([^\r]*)\r\n', body))
        fields["auth"] = self.headers.get("Authorization", "")
        _Stub.seen.append(fields)
        if fields["category"] == "slow":
            time.sleep(1.0)
        self._answer(*ANSWERS.get(fields["category"], ANSWERS["ok"]))

    def do_GET(self) -> None:
        self._answer(200, {}, {"categories": [{"name": "bottle"}, {"name": "screw"}]})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def stub() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Stub)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def inspect(url: str, category: str, timeout_s: float = 5.0, deadline_ms: int | None = 900):
    async def main():
        client = ServiceClient(url, "k-1")
        try:
            return await client.inspect(b"\x89PNG", "p.png", category=category, part_id="P-1", request_id="cam1-p1",
                                        source="cam1", timeout_s=timeout_s, deadline_ms=deadline_ms)
        finally:
            await client.close()

    return asyncio.run(main())


def test_a_verdict_carries_the_services_judgement_and_the_request_the_line_fields(stub):
    outcome = inspect(stub, "bottle")
    assert outcome == Verdict("r1", True, False, 0.7, 0.5, "crack", [ANSWERS["ok"][2]["boxes"][0]])
    sent = _Stub.seen[-1]
    assert sent == {"category": "bottle", "part_id": "P-1", "request_id": "cam1-p1", "source": "cam1",
                    "heatmap": "none", "deadline_ms": "900", "auth": "Bearer k-1"}


@pytest.mark.parametrize("category, reason, status, code, transient", [
    ("busy", "busy", 429, "queue_full", True),
    ("away", "unavailable", 503, "not_ready", True),
    ("late", "timeout", 504, "deadline_exceeded", True),
    ("boom", "server_error", 500, "inspection_failed", True),
    ("bad", "refused", 422, "invalid_image", False),
    ("nope", "refused", 404, "unknown_category", False),
])
def test_every_failure_is_typed_with_its_status_and_code(stub, category, reason, status, code, transient):
    outcome = inspect(stub, category)
    assert isinstance(outcome, Failure)
    assert (outcome.reason, outcome.status, outcome.code, outcome.transient) == (reason, status, code, transient)
    if category == "busy":
        assert outcome.retry_after_s == 2


def test_no_answer_in_time_and_nobody_listening_are_timeout_and_unreachable(stub):
    slow = inspect(stub, "slow", timeout_s=0.3)
    assert isinstance(slow, Failure) and slow.reason == "timeout" and slow.transient
    gone = inspect(f"http://127.0.0.1:{free_port()}", "bottle")
    assert isinstance(gone, Failure) and gone.reason == "unreachable" and gone.transient


def test_categories_and_a_service_that_is_not_there(stub):
    async def main() -> None:
        client = ServiceClient(stub, "k")
        assert await client.categories() == ["bottle", "screw"]
        await client.close()
        gone = ServiceClient(f"http://127.0.0.1:{free_port()}", "k")
        with pytest.raises(ServiceError, match="unreachable"):
            await gone.categories()
        await gone.close()

    asyncio.run(main())


def test_part_ids_are_made_acceptable_and_request_ids_are_stable_per_image():
    assert sanitise_part_id("SN-0001") == "SN-0001"
    assert sanitise_part_id("lot 7/part #3") == "lot_7/part__3"
    assert sanitise_part_id("") == "part"
    long_a, long_b = sanitise_part_id("x" * 80 + "a"), sanitise_part_id("x" * 80 + "b")
    assert len(long_a) == 64 and long_a != long_b
    image, other = b"one image", b"another image"
    rid = request_id_for("line1/cam1", "lot 7/part #3", image)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", rid)
    assert rid == request_id_for("line1/cam1", "lot 7/part #3", image)  # a retry or a restart: the same record
    assert rid != request_id_for("line1/cam1", "lot 7/part #3", other)  # a camera reusing a name: a new record
    assert rid != request_id_for("line1/cam2", "lot 7/part #3", image)
    assert len(request_id_for("s" * 64, "p" * 64, image)) <= 64
