"""The API's hardening, each point checked on the wire: a real uvicorn server under the
configuration `filo serve` uses, the real demo engine, raw sockets where the HTTP client would hide it."""

from __future__ import annotations

import io
import json
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import h11
import httpx
import pytest
from PIL import Image

from descriptions import CATEGORY_NAME_PATTERN, Category, CategoryCatalog
from service.api.app import create_app
from service.api.server import BoundedConnection, BoundedH11Protocol, serve_config
from service.backends.embedded import EmbeddedBackend
from service.core.imaging import ImageDecodeError, probe_image
from tests.service_fixtures import ServerThread, demo_settings, png_bytes, wait_ready

API_KEY, ADMIN_KEY = "key-1", "admin-1"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MAX_BODY, MAX_PIXELS, MAX_HEAD = 200_000, 1_000_000, 64 * 1024


async def _boom() -> None:
    raise RuntimeError("a bug")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    settings = demo_settings(state_dir=tmp_path_factory.mktemp("filo-state"), api_keys=[API_KEY], admin_key=ADMIN_KEY,
                             max_body_bytes=MAX_BODY, max_image_pixels=MAX_PIXELS)
    assert settings.max_header_bytes == MAX_HEAD  # the documented default
    app = create_app(settings, EmbeddedBackend(settings))
    app.add_api_route("/test/boom", _boom, include_in_schema=False)  # an unhandled bug: the 500 path
    with ServerThread(app) as srv:
        wait_ready(srv.url)
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    return body["error"]


# --- 1. the request head is bounded -------------------------------------------------------------------------


def _exchange(port: int, head: bytes, stream: bytes = b"", stream_total: int = 0) -> tuple[bytes, int, float]:
    """Send `head`, then `stream` repeatedly up to `stream_total` bytes unless the server stops us;
    read the answer until the server closes. Returns (answer, bytes sent, seconds to the answer)."""
    t0 = time.monotonic()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        try:
            s.sendall(head)
            sent += len(head)
            while sent < stream_total:
                s.sendall(stream)
                sent += len(stream)
        except OSError:  # the server answered and closed while we were still sending: what a bound does
            pass
        answer = b""
        try:
            while part := s.recv(65536):
                answer += part
        except OSError:
            pass
    return answer, sent, time.monotonic() - t0


def _status_and_body(answer: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _get(path: str, *extra: bytes) -> bytes:
    return b"".join([f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode(), *extra, b"\r\n"])


def test_a_head_over_64_kib_is_refused_431_and_a_normal_one_served(server: ServerThread) -> None:
    # just under the limit, with the key: served
    answer, _, _ = _exchange(server.port, _get("/v1/categories", f"Authorization: Bearer {API_KEY}\r\n".encode(),
                                               b"X-Pad: " + b"p" * (MAX_HEAD - 1024) + b"\r\n"))
    assert _status_and_body(answer)[0] == 200, answer[:300]
    # a head over the limit sent whole (no key, either): 431 with the JSON error, at once
    answer, _, took = _exchange(server.port, _get("/v1/categories", b"X-Big: " + b"b" * (MAX_HEAD + 4096) + b"\r\n"))
    status, headers, body = _status_and_body(answer)
    assert status == 431 and answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), answer[:300]
    assert headers[b"content-type"] == b"application/json" and headers[b"x-content-type-options"] == b"nosniff"
    error = json.loads(body)["error"]
    assert error["code"] == "headers_too_large" and str(MAX_HEAD) in error["message"]
    assert took < 5
    # 256 MB of header lines offered (the case): refused long before it could all be read
    line = b"X-Flood: " + b"f" * 8192 + b"\r\n"
    answer, sent, took = _exchange(server.port, _get("/v1/inspect")[:-2], line, 256 * 2**20)
    assert _status_and_body(answer)[0] == 431, answer[:300]
    assert sent < 64 * 2**20 and took < 10, (sent, took)  # what the kernels buffered, not what was offered
    # and the service goes on serving
    assert httpx.get(f"{server.url}/v1/categories", headers=AUTH, timeout=30).status_code == 200


def test_the_bounded_connection_refuses_a_long_head_whole_or_in_pieces() -> None:
    """Both ways a head can be too long: complete in one read (h11 would accept it) or still incomplete
    past the limit (h11's own bound); either is the 431 case, and a head at the limit is not."""
    def head(size: int, end: bool = True) -> bytes:
        start = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: "
        pad = size - len(start) - 4
        return start + b"a" * pad + (b"\r\n\r\n" if end else b"")

    ok = BoundedConnection(4096)
    ok.receive_data(head(4096))
    assert isinstance(ok.next_event(), h11.Request) and not ok.head_too_large
    whole = BoundedConnection(4096)
    whole.receive_data(head(4097))
    with pytest.raises(h11.RemoteProtocolError):
        whole.next_event()
    assert whole.head_too_large
    pieces = BoundedConnection(4096)
    pieces.receive_data(head(5000, end=False))
    with pytest.raises(h11.RemoteProtocolError):
        pieces.next_event()
    assert pieces.head_too_large
    garbage = BoundedConnection(4096)  # any other protocol error stays uvicorn's 400
    garbage.receive_data(b"NOT HTTP\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError):
        garbage.next_event()
    assert not garbage.head_too_large


def test_filo_serve_runs_the_bounded_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    """`filo serve` builds its uvicorn config with serve_config: h11 (never httptools), the head bounded."""
    import asyncio

    import uvicorn

    from service.cli import serve_cmd

    seen: dict = {}

    async def fake_serve(self: uvicorn.Server, sockets: object = None) -> None:
        seen["config"] = self.config

    class Backend:
        fatal = None

    monkeypatch.setattr(uvicorn.Server, "serve", fake_serve)
    settings = demo_settings(max_header_bytes=10_000)
    assert asyncio.run(serve_cmd._serve(object(), Backend(), settings, "warning")) == 0  # type: ignore[arg-type]
    config = seen["config"]
    assert config.http is BoundedH11Protocol and config.h11_max_incomplete_event_size == 10_000
    assert serve_config(object(), settings).http is BoundedH11Protocol


# --- 2. one name rule: every listed category is addressable ------------------------------------------------------


def test_every_listed_category_is_addressable(client: httpx.Client) -> None:
    names = [c["name"] for c in client.get("/v1/categories", headers=AUTH).json()["categories"]]
    assert {"metal nut", "pipe fryum", "bottle"} <= set(names)
    for name in names:
        r = client.get(f"/v1/categories/{quote(name, safe='')}", headers=AUTH)
        assert r.status_code == 200, (name, r.text)
        assert r.json()["name"] == name
    r = client.get("/v1/categories/metal%20nut/references", headers=AUTH)
    assert r.status_code == 200 and r.json()["category"] == "metal nut"
    # a name with a space registers, reads back, inspects and deletes through the same routes
    body = {"noun": "gasket", "descriptions": ["torn lip", "air bubble"]}
    assert client.put("/v1/categories/rubber%20gasket", json=body, headers=ADMIN).status_code == 200
    assert client.get("/v1/categories/rubber%20gasket", headers=AUTH).json()["name"] == "rubber gasket"
    r = client.post("/v1/inspect", data={"category": "rubber gasket"}, files={"image": ("x.png", png_bytes(), "image/png")},
                    headers=AUTH)
    assert r.status_code == 200, r.text
    assert client.delete("/v1/categories/rubber%20gasket", headers=ADMIN).status_code == 204
    # names outside the rule are refused by the route, the same rule the catalog holds
    for bad in ("-lead", "trailing%20", "%20lead", "semi%3Bcolon", "x" * 101):
        _error(client.get(f"/v1/categories/{bad}", headers=AUTH), 422, "validation_error")
        _error(client.put(f"/v1/categories/{bad}", json=body, headers=ADMIN), 422, "validation_error")


def test_descriptions_with_braces_register_and_inspect(client: httpx.Client) -> None:
    """Found by schemathesis: a description's `}` broke the prompt format string (500); braces are text."""
    body = {"descriptions": ["bent {rim}", "stray } brace", "a {0} placeholder"]}
    r = client.put("/v1/categories/braces", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    r = client.post("/v1/inspect", data={"category": "braces", "top_k": "3"},
                    files={"image": ("x.png", png_bytes(), "image/png")}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert {t["description"] for t in r.json()["top_types"]} == set(body["descriptions"])
    assert client.delete("/v1/categories/braces", headers=ADMIN).status_code == 204


def test_the_catalog_holds_the_same_rule() -> None:
    import re

    for name in CategoryCatalog.load().names():
        assert re.fullmatch(CATEGORY_NAME_PATTERN, name), name
    for bad in ("-lead", "trailing ", " lead", "semi;colon", "a/b", "x" * 101):
        with pytest.raises(ValueError):
            Category(name=bad, noun="n", descriptions=("d",))
    assert Category(name="metal nut", noun="n", descriptions=("d",)).name == "metal nut"


# --- 3. the key before the body -----------------------------------------------------------------------------------


def test_auth_comes_before_a_bad_body(client: httpx.Client) -> None:
    json_type = {"Content-Type": "application/json"}
    malformed, not_utf8 = b'{"descriptions": ["crack"', b'{"descriptions": ["\xff\xfe"]}'
    multipart = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    broken_multipart = b"garbage, not a part"
    cases = [  # (method, path, body, headers, the status and code with the right key)
        ("PUT", "/v1/categories/gear", malformed, json_type, ADMIN, 422, "validation_error"),
        ("PUT", "/v1/categories/gear", not_utf8, json_type, ADMIN, 400, "bad_request"),
        ("POST", "/v1/inspect", malformed, json_type, AUTH, 422, "validation_error"),
        ("POST", "/v1/inspect", not_utf8, json_type, AUTH, 400, "bad_request"),
        ("POST", "/v1/inspect", broken_multipart, multipart, AUTH, 400, "bad_request"),
    ]
    for method, path, content, headers, key, status, code in cases:
        for no_key in ({}, {"Authorization": "Bearer wrong"}):  # no key, or a wrong one: 401, whatever the body
            r = client.request(method, path, content=content, headers={**headers, **no_key})
            assert r.headers["www-authenticate"] == "Bearer"
            _error(r, 401, "unauthorized")
        _error(client.request(method, path, content=content, headers={**headers, **key}), status, code)
    # a body that is fine but the key is not admin: still 403 before anything is registered
    _error(client.put("/v1/categories/gear", json={"descriptions": ["crack"]}, headers=AUTH), 403, "forbidden")
    _error(client.get("/v1/categories/gear", headers=AUTH), 404, "unknown_category")
    # JSON only where JSON is taken
    _error(client.put("/v1/categories/gear", content=b"descriptions=crack",
                      headers={**ADMIN, "Content-Type": "application/x-www-form-urlencoded"}),
           415, "unsupported_media_type")


def test_bad_request_is_a_documented_code(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert "| 400 | bad_request |" in spec["info"]["description"]
    assert "| 431 | headers_too_large |" in spec["info"]["description"]
    for path, method in (("/v1/inspect", "post"), ("/v1/categories/{name}", "put")):
        assert "400" in spec["paths"][path][method]["responses"], (path, method)
    service_doc = (Path(__file__).resolve().parents[1] / "docs" / "service.md").read_text()
    for code in ("bad_request", "headers_too_large", "FILO_MAX_HEADER_BYTES"):
        assert code in service_doc, code


# --- 4. Allow lists every method of the path -----------------------------------------------------------------------


def test_405_allow_lists_every_method_of_the_path(client: httpx.Client) -> None:
    cases = {
        "/v1/categories/bottle": {"GET", "PUT", "DELETE"},
        "/v1/categories/metal%20nut/references": {"GET", "PUT", "DELETE"},
        "/v1/categories/bottle/calibrate": {"POST"},
        "/v1/categories": {"GET"},
        "/v1/inspect": {"POST"},
    }
    for path, methods in cases.items():
        wrong = "PATCH"
        r = client.request(wrong, path, headers=ADMIN)
        _error(r, 405, "method_not_allowed")
        allowed = {m.strip() for m in r.headers["allow"].split(",")}
        assert allowed == methods, (path, r.headers["allow"])
    # and each listed method really is served there (GETs, which change nothing)
    assert client.get("/v1/categories/bottle", headers=AUTH).status_code == 200
    assert client.get("/v1/categories/bottle/references", headers=AUTH).status_code == 200


# --- 6. a decompression bomb is refused with the configured limit ----------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit grey) and whose pixels are a few bytes: a bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_bomb_past_pillows_own_limit_names_the_configured_one(client: httpx.Client) -> None:
    bomb = _png_header(10_000, 9_500)  # 95 MP: past Pillow's 89 MP warning, which must not answer before our limit does
    assert Image.open(io.BytesIO(bomb)).size == (10_000, 9_500)
    with pytest.raises(ImageDecodeError) as exc:
        probe_image(bomb, 40_000_000)
    assert exc.value.code == "decompression_bomb"
    assert "40000000" in exc.value.message and "max_image_pixels" in exc.value.message
    assert "DOS" not in exc.value.message  # not Pillow's words
    huge = _png_header(20_000, 10_000)  # 200 MP: past Pillow's hard error too
    with pytest.raises(ImageDecodeError) as exc:
        probe_image(huge, 40_000_000)
    assert "40000000" in exc.value.message
    # a configured limit above Pillow's is honoured (the header passes; pixels are checked at decode)
    assert probe_image(huge, 250_000_000).width == 20_000
    # on the wire: the server's own limit in the message
    r = client.post("/v1/inspect", data={"category": "bottle"}, files={"image": ("b.png", bomb, "image/png")},
                    headers=AUTH)
    err = _error(r, 422, "decompression_bomb")
    assert str(MAX_PIXELS) in err["message"] and "95000000" in err["message"]


# --- 7. nosniff on every response -------------------------------------------------------------------------------------


def test_json_responses_carry_nosniff(client: httpx.Client) -> None:
    responses = [
        client.get("/v1/categories", headers=AUTH),  # a JSON success
        client.post("/v1/inspect", data={"category": "bottle"}, files={"image": ("x.png", png_bytes(), "image/png")},
                    headers=AUTH),
        client.get("/healthz"),
        client.get("/v1/categories"),  # 401
        client.get("/v1/categories/nothing", headers=AUTH),  # 404 from a route
        client.get("/v1/nowhere", headers=AUTH),  # 404 from routing
        client.request("PATCH", "/v1/inspect", headers=AUTH),  # 405
        client.post("/v1/inspect", content=b"\0" * (MAX_BODY + 1), headers={**AUTH, "Content-Type": "image/png"}),  # 413
        client.get("/v1/categories/-x", headers=AUTH),  # 422
        client.get("/test/boom"),  # 500: answered outside the app's middleware
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 401, 404, 404, 405, 413, 422, 500]
    for r in responses:
        assert r.headers.get("x-content-type-options") == "nosniff", (r.status_code, r.request.url)
        assert r.headers["content-type"] == "application/json", (r.status_code, r.request.url)
    assert responses[-1].json()["error"]["code"] == "internal_error"
