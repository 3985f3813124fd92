"""The HTTP API end to end in embedded mode: a real uvicorn server, the real demo engine, real HTTP."""

from __future__ import annotations

import base64
import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.api.app import create_app
from service.backends.embedded import EmbeddedBackend
from service.backends.redis_queue import RedisBackend
from service.core.security import AuthConfigError
from service.settings import FiloSettings
from tests.service_fixtures import ServerThread, demo_settings, free_port, png_bytes, wait_ready

API_KEY, ADMIN_KEY = "key-1", "admin-1"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MAX_BODY = 200_000


def _settings(state_dir: Path, **kw: object) -> FiloSettings:
    base: dict[str, object] = {
        "state_dir": state_dir, "api_keys": [API_KEY], "admin_key": ADMIN_KEY, "thresholds": {"bottle": 0.25},
        "max_body_bytes": MAX_BODY, "max_image_pixels": 1_000_000, "grounding": True,
        "cors_origins": ["http://console.example"],
    }
    base.update(kw)
    return demo_settings(**base)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("filo-state")


@pytest.fixture(scope="module")
def server(state_dir: Path) -> Iterator[ServerThread]:
    settings = _settings(state_dir)
    with ServerThread(create_app(settings, EmbeddedBackend(settings))) as srv:
        body = wait_ready(srv.url)
        assert body["detail"]["cache_source"] == "built"  # a fresh state dir: nothing persisted yet
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _inspect(client: httpx.Client, image: bytes, headers: dict | None = None, **fields: str) -> httpx.Response:
    data = {"category": "bottle", "grounding": "false", **fields}
    return client.post("/v1/inspect", data=data, files={"image": ("x.png", image, "image/png")},
                       headers=AUTH if headers is None else headers)


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    return body["error"]


# --- inspection ----------------------------------------------------------------------------------------------


def test_multipart_inspection_returns_everything(client: httpx.Client) -> None:
    h, w = 90, 140
    r = _inspect(client, png_bytes(h, w), grounding="true", top_k="3")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == r.headers["x-request-id"]
    assert body["category"] == "bottle" and body["threshold"] == 0.25
    assert body["is_anomalous"] == (body["score"] >= 0.25)
    assert len(body["top_types"]) == 3 and {"description", "similarity"} <= set(body["top_types"][0])
    for box in body["boxes"]:  # original pixels, not the 224 model frame
        assert 0 <= box["x1"] <= box["x2"] <= w and 0 <= box["y1"] <= box["y2"] <= h
        assert {"phrase", "confidence"} <= set(box)
    assert body["position"] is None or isinstance(body["position"], str)
    assert set(body["model"]) >= {"name", "version", "tap_layout"}
    assert set(body["timing_ms"]) == {"queue_wait", "model", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["model"] > 0
    # the default heatmap: a JPEG overlay, never enlarged past the image; the deprecated heatmap_png stays empty
    assert body["heatmap_png"] is None
    meta = body["heatmap"]
    assert (meta["media_type"], meta["kind"], meta["width"], meta["height"]) == ("image/jpeg", "overlay", w, h)
    heat = Image.open(io.BytesIO(base64.b64decode(meta["base64"])))
    assert heat.format == "JPEG" and heat.size == (w, h)


def test_heatmap_formats_and_sizes(client: httpx.Client) -> None:
    image = png_bytes(150, 200)
    cases = [  # (fields, media type, kind, size)
        ({"heatmap": "png"}, "image/png", "overlay", (200, 150)),
        ({"heatmap": "jpeg", "heatmap_size": "100"}, "image/jpeg", "overlay", (100, 75)),
        ({"heatmap": "jpeg", "heatmap_size": "frame"}, "image/jpeg", "overlay", (224, 224)),
        ({"heatmap": "map", "heatmap_size": "frame"}, "image/png", "map", (224, 224)),
        ({"heatmap": "map", "heatmap_size": "original"}, "image/png", "map", (200, 150)),
        ({"heatmap": "png", "heatmap_size": "1000"}, "image/png", "overlay", (200, 150)),  # never enlarged
    ]
    for fields, media, kind, size in cases:
        r = _inspect(client, image, **fields)
        assert r.status_code == 200, (fields, r.text)
        body = r.json()
        meta = body["heatmap"]
        assert (meta["media_type"], meta["kind"], (meta["width"], meta["height"])) == (media, kind, size), fields
        pic = Image.open(io.BytesIO(base64.b64decode(meta["base64"])))
        assert pic.size == size and pic.mode == ("L" if kind == "map" else "RGB")
        # the deprecated field: filled only for heatmap=png, with the same picture
        assert body["heatmap_png"] == (meta["base64"] if fields["heatmap"] == "png" else None)
    for bad in ("5", "huge", "-3", "0"):
        err = _error(_inspect(client, image, heatmap_size=bad), 422, "validation_error")
        assert err["fields"][0]["field"] == "heatmap_size"


def test_json_inspection_without_heatmap(client: httpx.Client) -> None:
    payload = {"image_base64": base64.b64encode(png_bytes(64, 64, fmt="JPEG")).decode(), "category": "bottle",
               "heatmap": "none", "grounding": False, "top_k": 2}
    r = client.post("/v1/inspect", json=payload, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["heatmap_png"] is None and r.json()["heatmap"] is None and len(r.json()["top_types"]) == 2
    assert r.json()["threshold"] == 0.25


def test_accept_png_returns_the_heatmap_itself(client: httpx.Client) -> None:
    r = _inspect(client, png_bytes(50, 70), headers={**AUTH, "Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (70, 50)


# --- bad input: each answered in the one error shape, and the service keeps serving --------------------------


def _truncated() -> bytes:
    data = png_bytes(200, 200, seed=3)
    return data[: len(data) // 2]


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1500, 1000)).save(buf, format="PNG")  # 1.5 MP in a few kB; the limit is 1 MP
    return buf.getvalue()


def test_bad_images(client: httpx.Client) -> None:
    _error(_inspect(client, b"definitely not an image"), 415, "not_an_image")
    _error(_inspect(client, b""), 415, "not_an_image")
    _error(_inspect(client, _truncated()), 422, "truncated_image")
    _error(_inspect(client, _bomb()), 422, "decompression_bomb")
    assert _inspect(client, png_bytes()).status_code == 200


def test_bad_requests(client: httpx.Client) -> None:
    _error(client.post("/v1/inspect", content=b"hello", headers={**AUTH, "Content-Type": "text/plain"}),
           415, "unsupported_media_type")
    missing = _error(client.post("/v1/inspect", files={"image": ("x.png", png_bytes(), "image/png")}, headers=AUTH),
                     422, "missing_field")
    assert [f["field"] for f in missing["fields"]] == ["category"] and "category" in missing["message"]
    missing = _error(client.post("/v1/inspect", json={"image_base64": base64.b64encode(png_bytes()).decode()},
                                 headers=AUTH), 422, "missing_field")
    assert [f["field"] for f in missing["fields"]] == ["category"]
    err = _error(_inspect(client, png_bytes(), category="no-such-thing"), 404, "unknown_category")
    assert "bottle" in err["known_categories"] and "bottle" in err["message"]
    err = _error(_inspect(client, png_bytes(), top_k="0"), 422, "validation_error")
    assert err["fields"][0]["field"] == "top_k"
    _error(_inspect(client, png_bytes(), heatmap="gif"), 422, "validation_error")
    _error(_inspect(client, png_bytes(), colour="blue"), 422, "validation_error")
    _error(client.post("/v1/inspect", data={"category": "bottle"}, headers=AUTH), 415, "unsupported_media_type")
    err = _error(client.post("/v1/inspect", data={"category": "bottle"},
                             files={"picture": ("x.png", png_bytes(), "image/png")}, headers=AUTH),
                 422, "missing_field")
    assert err["fields"][0]["field"] == "image"
    err = _error(client.post("/v1/inspect", data={"top_k": "2"},  # both missing: both named
                             files={"picture": ("x.png", png_bytes(), "image/png")}, headers=AUTH),
                 422, "missing_field")
    assert sorted(f["field"] for f in err["fields"]) == ["category", "image"]
    _error(client.post("/v1/inspect", json={"image_base64": "***", "category": "bottle"}, headers=AUTH),
           422, "invalid_base64")
    _error(client.post("/v1/inspect", json={"category": "bottle"}, headers=AUTH), 422, "missing_field")
    _error(client.post("/v1/inspect", json={"category": "bottle", "image_base64": "x", "top_k": 0}, headers=AUTH),
           422, "validation_error")
    _error(client.post("/v1/inspect", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}),
           422, "validation_error")
    _error(client.get("/v1/nothing-here", headers=AUTH), 404, "not_found")
    _error(client.delete("/v1/inspect", headers=AUTH), 405, "method_not_allowed")
    assert _inspect(client, png_bytes()).status_code == 200


def test_oversize_body_declared(client: httpx.Client) -> None:
    big = b"\0" * (MAX_BODY + 10)
    _error(_inspect(client, big), 413, "body_too_large")
    assert _inspect(client, png_bytes()).status_code == 200


def _raw_http(port: int, head: bytes, chunks: list[bytes], read_timeout: float = 10) -> bytes:
    """Send a request head and some body chunks, then read the answer WITHOUT sending the rest."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head)
        for c in chunks:
            s.sendall(c)
        data = b""
        deadline = time.monotonic() + read_timeout
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            part = s.recv(65536)
            if not part:
                break
            data += part
        return data


def test_oversize_body_refused_while_streaming(server: ServerThread) -> None:
    """A chunked upload with no Content-Length is cut off at the limit, before it has all arrived."""
    head = (f"POST /v1/inspect HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: multipart/form-data; boundary=XyZ\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    part = (b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    piece = b"A" * 65536
    # about 1.3x the limit is sent, the terminating chunk never is: only a streaming check can answer
    answer = _raw_http(server.port, head, [chunk(part)] + [chunk(piece)] * (MAX_BODY * 13 // 10 // len(piece) + 1))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # declared too large: refused before any body byte is sent
    head2 = (f"POST /v1/inspect HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
             f"Content-Type: application/json\r\nContent-Length: {50 * MAX_BODY}\r\n\r\n").encode()
    assert _raw_http(server.port, head2, []).startswith(b"HTTP/1.1 413")


# --- auth ------------------------------------------------------------------------------------------------------


def test_auth_on_inspection(client: httpx.Client) -> None:
    r = _inspect(client, png_bytes(), headers={})
    _error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    _error(_inspect(client, png_bytes(), headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    _error(_inspect(client, png_bytes(), headers={"Authorization": "Basic a2V5LTE="}), 401, "unauthorized")
    assert _inspect(client, png_bytes(), headers=AUTH).status_code == 200
    assert _inspect(client, png_bytes(), headers=ADMIN).status_code == 200
    _error(client.get("/v1/categories"), 401, "unauthorized")
    assert client.get("/v1/categories", headers=AUTH).status_code == 200


def test_category_writes_need_the_admin_key(client: httpx.Client) -> None:
    body = {"noun": "gasket", "descriptions": ["torn edge", "missing rubber"]}
    _error(client.put("/v1/categories/gasket", json=body), 401, "unauthorized")
    _error(client.put("/v1/categories/gasket", json=body, headers={"Authorization": "Bearer nope"}),
           401, "unauthorized")
    _error(client.put("/v1/categories/gasket", json=body, headers=AUTH), 403, "forbidden")
    _error(client.delete("/v1/categories/bottle", headers=AUTH), 403, "forbidden")
    assert client.get("/v1/categories/bottle", headers=AUTH).status_code == 200


def test_production_refuses_to_start_open(tmp_path: Path) -> None:
    prod = FiloSettings(profile="production", state_dir=tmp_path)
    with pytest.raises(AuthConfigError, match="FILO_API_KEYS"):
        create_app(prod, EmbeddedBackend(prod))
    create_app(prod.model_copy(update={"allow_open": True}), EmbeddedBackend(prod))
    create_app(prod.model_copy(update={"api_keys": ["k"]}), EmbeddedBackend(prod))


def test_demo_runs_open() -> None:
    settings = demo_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    with ServerThread(create_app(settings, RedisBackend(settings))) as srv:
        r = httpx.get(f"{srv.url}/v1/categories", timeout=30)
        _error(r, 503, "redis_unavailable")  # got past auth without a key


# --- categories ------------------------------------------------------------------------------------------------


def test_register_inspect_and_delete_a_category(client: httpx.Client) -> None:
    body = {"noun": "washer", "descriptions": ["scratched ring", "bent edge", "rust spot"]}
    r = client.put("/v1/categories/washer", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "washer", "noun": "washer", "descriptions": body["descriptions"],
                        "status": "active", "draft_path": None,
                        "workers_ready": None, "workers_live": None}  # embedded: built in-process before answering
    names = [c["name"] for c in client.get("/v1/categories", headers=AUTH).json()["categories"]]
    assert "washer" in names and "bottle" in names
    assert client.get("/v1/categories/washer", headers=AUTH).json()["noun"] == "washer"
    r = _inspect(client, png_bytes(), category="washer", top_k="3")
    assert r.status_code == 200, r.text
    assert {t["description"] for t in r.json()["top_types"]} <= set(body["descriptions"])
    assert client.delete("/v1/categories/washer", headers=ADMIN).status_code == 204
    _error(client.get("/v1/categories/washer", headers=AUTH), 404, "unknown_category")
    _error(_inspect(client, png_bytes(), category="washer"), 404, "unknown_category")
    _error(client.delete("/v1/categories/washer", headers=ADMIN), 404, "unknown_category")


def test_bad_category_bodies(client: httpx.Client) -> None:
    _error(client.put("/v1/categories/gear", json={"descriptions": ["chipped. tooth"]}, headers=ADMIN),
           422, "validation_error")
    _error(client.put("/v1/categories/gear", json={"descriptions": []}, headers=ADMIN), 422, "validation_error")
    _error(client.put("/v1/categories/gear", json={"descriptions": ["a"], "colour": 1}, headers=ADMIN),
           422, "validation_error")
    _error(client.put("/v1/categories/bad%21name", json={"descriptions": ["a"]}, headers=ADMIN),
           422, "validation_error")  # outside the name rule ('metal nut' is inside: tests/test_api_hardening.py)


# --- health, metrics, docs, CORS --------------------------------------------------------------------------------


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["mode"] == "embedded"


def _sample(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_move(client: httpx.Client) -> None:
    before = client.get("/metrics").text
    assert _inspect(client, png_bytes()).status_code == 200
    _inspect(client, b"nope")
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    for name in ("filo_http_request_duration_seconds_bucket", "filo_requests_total", "filo_queue_wait_seconds",
                 "filo_model_seconds", "filo_batch_size", "filo_queue_depth", "filo_inflight_requests",
                 "filo_errors_total", "filo_workers", "filo_gpu_memory_bytes"):
        assert name in text, name
    ok = 'filo_requests_total{route="/v1/inspect",status="200"}'
    assert _sample(text, ok) == _sample(before, ok) + 1
    bad = 'filo_errors_total{reason="not_an_image"}'
    assert _sample(text, bad) == _sample(before, bad) + 1
    assert _sample(text, "filo_batch_size_count") > _sample(before, "filo_batch_size_count")
    assert _sample(text, "filo_model_seconds_count") > _sample(before, "filo_model_seconds_count")
    assert 'method="POST",route="/v1/inspect",status="200"' in text
    assert _sample(text, "filo_workers") == 1


def test_openapi_documents_both_bodies_and_errors(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/inspect"]["post"]
    assert {"multipart/form-data", "application/json"} <= set(op["requestBody"]["content"])
    assert {"200", "404", "413", "415", "422", "429", "503", "504"} <= set(op["responses"])
    assert "/v1/categories/{name}" in spec["paths"]


def test_cors(client: httpx.Client) -> None:
    r = client.options("/v1/inspect", headers={"Origin": "http://console.example",
                                               "Access-Control-Request-Method": "POST"})
    assert r.headers.get("access-control-allow-origin") == "http://console.example"
    r = client.options("/v1/inspect", headers={"Origin": "http://evil.example",
                                               "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


# --- restart ------------------------------------------------------------------------------------------------------


def test_restart_reads_persisted_caches_and_categories(server: ServerThread, client: httpx.Client,
                                                      state_dir: Path) -> None:
    body = {"noun": "valve", "descriptions": ["leaking seal", "cracked body"]}
    assert client.put("/v1/categories/valve", json=body, headers=ADMIN).status_code == 200
    settings = _settings(state_dir)
    with ServerThread(create_app(settings, EmbeddedBackend(settings))) as second:
        early = httpx.get(f"{second.url}/readyz", timeout=10)
        assert early.status_code == 503 and early.json()["ready"] is False  # /readyz waits for the model
        assert httpx.get(f"{second.url}/healthz", timeout=10).status_code == 200  # ... /healthz does not
        detail = wait_ready(second.url)["detail"]
        assert detail["cache_source"] == "persisted" and detail["cache_entries_loaded"] > 0
        with httpx.Client(base_url=second.url, timeout=60) as c2:
            assert c2.get("/v1/categories/valve", headers=AUTH).json()["noun"] == "valve"
            assert _inspect(c2, png_bytes(), category="valve").status_code == 200
    assert client.delete("/v1/categories/valve", headers=ADMIN).status_code == 204
