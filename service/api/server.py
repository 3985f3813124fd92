"""How the API is served: uvicorn on the h11 protocol, with the request head bounded.

A request's head (request line and headers together) is held in memory until it is complete, so
it is bounded by `max_header_bytes` (docs/service.md, limits): a longer head is answered 431
`headers_too_large` and the connection closed, having read at most the limit plus one socket read.
The protocol is chosen explicitly (h11, never uvicorn's "auto", which picks httptools when it is
installed and reads a head of any size): h11 holds an incomplete head to
`h11_max_incomplete_event_size`, and the subclass below also measures a head that arrived whole in
one read, and answers 431 where uvicorn would answer a bare 400.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.core.errors import error_body
from service.settings import FiloSettings

HEADERS_TOO_LARGE = "headers_too_large"


def head_size(event: h11.Request) -> int:
    """The bytes of a request head as sent: request line, each `name: value` line, the blank line."""
    line = len(event.method) + len(event.target) + len(b"HTTP/1.1") + 4
    return line + sum(len(name) + len(value) + 4 for name, value in event.headers.raw_items()) + 2


class BoundedConnection(h11.Connection):
    """h11's connection, refusing a complete request head over `max_head` too (h11 bounds only an
    incomplete one) and remembering why it refused, so the protocol can say 431."""

    def __init__(self, max_head: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head)
        self.max_head = max_head
        self.head_too_large = False

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.head_too_large = exc.error_status_hint == 431
            raise
        if isinstance(event, h11.Request) and head_size(event) > self.max_head:
            self.head_too_large = True
            raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        return event


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the head bounded (`config.h11_max_incomplete_event_size`) and a
    JSON 431 for a head over it; every other protocol error keeps uvicorn's 400."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        limit = config.h11_max_incomplete_event_size
        assert limit is not None, "BoundedH11Protocol needs h11_max_incomplete_event_size (serve_config sets it)"
        self.conn = BoundedConnection(limit)

    def send_400_response(self, msg: str) -> None:
        conn = self.conn
        if not (isinstance(conn, BoundedConnection) and conn.head_too_large):
            super().send_400_response(msg)
            return
        self.logger.warning("request head over %d bytes refused (431)", conn.max_head)
        body = json.dumps(error_body(
            HEADERS_TOO_LARGE, f"the request line and headers exceed {conn.max_head} bytes (max_header_bytes)",
        )).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"x-content-type-options", b"nosniff"), (b"connection", b"close")]
        try:
            self.transport.write(conn.send(h11.Response(status_code=431, headers=headers,
                                                        reason=b"Request Header Fields Too Large")))
            self.transport.write(conn.send(h11.Data(data=body)))
            self.transport.write(conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # a response had started already: nothing more can be said
            pass
        self.transport.close()


def serve_config(app: Any, settings: FiloSettings, **kwargs: Any) -> uvicorn.Config:
    """The uvicorn configuration `filo serve` runs the app under (tests use it too): the host and
    port from the settings unless given, the bounded h11 protocol, the head limit."""
    kwargs.setdefault("host", settings.host)
    kwargs.setdefault("port", settings.port)
    return uvicorn.Config(app, http=BoundedH11Protocol, h11_max_incomplete_event_size=settings.max_header_bytes,
                          **kwargs)


class SideServer(uvicorn.Server):
    """A second listener in the same process (/metrics on `metrics_port`): it leaves the signals to the API's
    server, whose stop stops it too (`filo serve` sets `should_exit`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
