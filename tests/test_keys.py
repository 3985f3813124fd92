"""Least privilege for keys, route by route: every route of the app against every role (no key, camera, limited
camera, reader, limited reader, reviewer, limited reviewer, admin) on a real server in embedded mode; a limited
key's reach in the records query (SQLite and PostgreSQL) and at the routes; the limits checked at start; the open
servers as before; /metrics behind a key or on a port of its own and the OpenAPI pages off, under `filo serve`.

`ACCESS` is the table of docs/records.md ("Keys, roles and limits"); a test reads that table and fails when the
two disagree, and the matrix fails when the app has a route `ACCESS` does not list.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.app import create_app, create_metrics_app
from service.backends.embedded import EmbeddedBackend
from service.core.security import AuthConfigError
from service.records.model import InspectionRecord, RecordQuery
from service.records.store import RecordStore
from service.settings import FiloSettings
from tests.service_fixtures import REPO, ServerThread, demo_settings, free_port, png_bytes, wait_ready, wait_until

DOCS = REPO / "docs" / "records.md"

# --- the keys, one per role ---------------------------------------------------------------------------------

SECRETS = {
    "camera": "cam-secret", "limited camera": "line-a-secret", "reader": "qa-secret",
    "limited reader": "supplier-secret", "reviewer": "rev-secret", "limited reviewer": "lina-secret",
    "admin": "boss-secret",
}
ROLES = ("none", *SECRETS)
LIMITS = {"line-a": {"categories": ["bottle"], "sources": ["line-a"]},
          "supplier": {"categories": ["bottle"], "sources": ["line-a"]},
          "lina": {"categories": ["bottle"]}}
KEY_SETTINGS = {
    "api_keys": ["cam:cam-secret", "line-a:line-a-secret"],
    "reader_keys": ["qa:qa-secret", "supplier:supplier-secret"],
    "reviewer_keys": ["rita:rev-secret", "lina:lina-secret"],
    "admin_key": "boss:boss-secret",
    "key_limits": LIMITS,
}


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[role]}"} if role != "none" else {}


# --- who may call what: the table of docs/records.md ------------------------------------------------------------

# what each column of the docs table admits; a limited key is its role within its limits
OPEN, CATALOG, INSPECT, READ, REVIEW, ADMIN = "open", "catalog", "inspect", "read", "review", "admin"
ADMITS = {
    OPEN: set(ROLES),
    CATALOG: set(SECRETS),
    INSPECT: {"camera", "limited camera", "reviewer", "limited reviewer", "admin"},
    READ: {"reader", "limited reader", "reviewer", "limited reviewer", "admin"},
    REVIEW: {"reviewer", "limited reviewer", "admin"},
    ADMIN: {"admin"},
}
DOC_COLUMNS = ("none", "camera", "reader", "reviewer", "admin")  # the docs table's role columns, in order

ACCESS: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): OPEN,
    ("GET", "/readyz"): OPEN,
    ("GET", "/metrics"): OPEN,
    ("GET", "/"): OPEN,
    ("GET", "/console"): OPEN,
    ("GET", "/console/static/{name}"): OPEN,
    ("GET", "/openapi.json"): OPEN,
    ("GET", "/docs"): OPEN,
    ("GET", "/docs/oauth2-redirect"): OPEN,
    ("GET", "/redoc"): OPEN,
    ("GET", "/v1/categories"): CATALOG,
    ("GET", "/v1/categories/{name}"): CATALOG,
    ("GET", "/v1/categories/{name}/references"): CATALOG,
    ("POST", "/v1/inspect"): INSPECT,
    ("GET", "/v1/inspections"): READ,
    ("GET", "/v1/inspections/export"): READ,
    ("GET", "/v1/stats"): READ,
    ("GET", "/v1/inspections/{record_id}"): READ,
    ("GET", "/v1/inspections/{record_id}/image"): READ,
    ("GET", "/v1/inspections/{record_id}/heatmap"): READ,
    ("GET", "/v1/inspections/{record_id}/reviews"): READ,
    ("GET", "/v1/categories/{name}/thresholds"): READ,
    ("POST", "/v1/inspections/{record_id}/review"): REVIEW,
    ("PUT", "/v1/categories/{name}"): ADMIN,
    ("DELETE", "/v1/categories/{name}"): ADMIN,
    ("PUT", "/v1/categories/{name}/references"): ADMIN,
    ("DELETE", "/v1/categories/{name}/references"): ADMIN,
    ("DELETE", "/v1/categories/{name}/references/{ref_id}"): ADMIN,
    ("POST", "/v1/categories/{name}/calibrate"): ADMIN,
    ("PUT", "/v1/categories/{name}/threshold"): ADMIN,
    ("POST", "/v1/categories/{name}/learn"): ADMIN,
    ("GET", "/v1/jobs/{job_id}"): ADMIN,
}


def expected(route: tuple[str, str], role: str) -> str:
    """The status class the table promises: the route's success class where the role is admitted, else 401
    without a key and 403 with one."""
    if role in ADMITS[ACCESS[route]]:
        return "3xx" if route == ("GET", "/") else "2xx"
    return "401" if role == "none" else "403"


def status_class(code: int) -> str:
    return f"{code // 100}xx" if code not in (401, 403) else str(code)


def app_routes(app) -> set[tuple[str, str]]:
    return {(method, route.path) for route in iter_route_contexts(app.routes)
            for method in (getattr(route, "methods", None) or ()) if method != "HEAD"}


def docs_table() -> dict[tuple[str, str], frozenset[str]]:
    """route -> the roles of `DOC_COLUMNS` the docs table admits (✓)."""
    text = DOCS.read_text()
    section = text[text.index("## Keys, roles and limits"):]
    table: dict[tuple[str, str], frozenset[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 1 + len(DOC_COLUMNS) or not cells[0].startswith("`"):
            continue
        routes = re.findall(r"`(GET|POST|PUT|DELETE) ([^`]+)`", cells[0])
        if not routes:
            continue
        marks = cells[1:1 + len(DOC_COLUMNS)]
        assert all(m in ("✓", "401", "403") for m in marks), line
        admitted = frozenset(role for role, mark in zip(DOC_COLUMNS, marks, strict=True) if mark == "✓")
        for route in routes:
            assert route not in table, f"{route} twice in the docs table"
            table[route] = admitted
    return table


def test_the_docs_table_is_this_table() -> None:
    documented = docs_table()
    assert set(documented) == set(ACCESS), set(documented) ^ set(ACCESS)
    for route, admitted in documented.items():
        assert admitted == ADMITS[ACCESS[route]] & set(DOC_COLUMNS), route


# --- the real server ---------------------------------------------------------------------------------------------

SCRATCH = {"noun": "scratch part", "descriptions": ["dent", "scratch"]}


@dataclass
class Server:
    url: str
    client: httpx.Client  # no key of its own: each request says which
    records: dict[str, str]  # what each record is -> its id


def _inspect(client: httpx.Client, role: str, category: str = "bottle", source: str | None = "line-a",
             seed: int = 0) -> httpx.Response:
    data = {"category": category, "heatmap": "none", **({"source": source} if source else {})}
    return client.post("/v1/inspect", data=data, files={"image": ("p.png", png_bytes(48, 48, seed=seed), "image/png")},
                       headers=auth(role))


def _put_refs(client: httpx.Client, name: str, n: int) -> list[str]:
    files = [("images", (f"r{i}.png", png_bytes(64, 64, seed=100 + i), "image/png")) for i in range(n)]
    r = client.put(f"/v1/categories/{name}/references", files=files, headers=auth("admin"))
    assert r.status_code == 200, r.text
    return [item["id"] for item in r.json()["items"]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    settings = demo_settings(state_dir=tmp_path_factory.mktemp("keys-state"), records_keep="all", **KEY_SETTINGS)
    with ServerThread(create_app(settings, EmbeddedBackend(settings))) as srv:
        wait_ready(srv.url)
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            for name in ("keys-refs", "keys-clear"):
                assert client.put(f"/v1/categories/{name}", json=SCRATCH, headers=auth("admin")).status_code == 200
            _put_refs(client, "keys-refs", 2)
            made = {"in": ("bottle", "line-a"), "other source": ("bottle", "line-b"),
                    "other category": ("cable", "line-a"), "no source": ("bottle", None)}
            records = {}
            for i, (what, (category, source)) in enumerate(made.items()):
                r = _inspect(client, "admin", category, source, seed=i)
                assert r.status_code == 200, r.text
                records[what] = r.json()["request_id"]
            for rid in records.values():
                wait_until(lambda rid=rid: client.get(f"/v1/inspections/{rid}", headers=auth("admin")).status_code
                           == 200, 30, what=f"record {rid}")
            yield Server(srv.url, client, records)


# One request per route, as an admitted role would send it: every path parameter names something that exists
# (a record within the limited keys' reach, the category they are limited to), so an admitted role gets 2xx.
# `prepare` makes what the request removes, for an admitted role only.

@dataclass
class Call:
    send: Callable[[httpx.Client, dict[str, str], Server, str], httpx.Response]
    prepare: Callable[[Server], str] | None = None


def _get(path: str) -> Call:
    return Call(lambda c, h, s, _: c.get(path.format(**s.records), headers=h, follow_redirects=False))


CALLS: dict[tuple[str, str], Call] = {
    ("GET", "/healthz"): _get("/healthz"),
    ("GET", "/readyz"): _get("/readyz"),
    ("GET", "/metrics"): _get("/metrics"),
    ("GET", "/"): _get("/"),
    ("GET", "/console"): _get("/console"),
    ("GET", "/console/static/{name}"): _get("/console/static/lib.js"),
    ("GET", "/openapi.json"): _get("/openapi.json"),
    ("GET", "/docs"): _get("/docs"),
    ("GET", "/docs/oauth2-redirect"): _get("/docs/oauth2-redirect"),
    ("GET", "/redoc"): _get("/redoc"),
    ("GET", "/v1/categories"): _get("/v1/categories"),
    ("GET", "/v1/categories/{name}"): _get("/v1/categories/bottle"),
    ("GET", "/v1/categories/{name}/references"): _get("/v1/categories/bottle/references"),
    ("POST", "/v1/inspect"): Call(lambda c, h, s, _: c.post(
        "/v1/inspect", data={"category": "bottle", "source": "line-a", "heatmap": "none"},
        files={"image": ("p.png", png_bytes(48, 48, seed=7), "image/png")}, headers=h)),
    ("GET", "/v1/inspections"): _get("/v1/inspections"),
    ("GET", "/v1/inspections/export"): _get("/v1/inspections/export"),
    ("GET", "/v1/stats"): _get("/v1/stats"),
    ("GET", "/v1/inspections/{record_id}"): _get("/v1/inspections/{in}"),
    ("GET", "/v1/inspections/{record_id}/image"): _get("/v1/inspections/{in}/image"),
    ("GET", "/v1/inspections/{record_id}/heatmap"): _get("/v1/inspections/{in}/heatmap"),
    ("GET", "/v1/inspections/{record_id}/reviews"): _get("/v1/inspections/{in}/reviews"),
    ("GET", "/v1/categories/{name}/thresholds"): _get("/v1/categories/bottle/thresholds"),
    ("POST", "/v1/inspections/{record_id}/review"): Call(lambda c, h, s, _: c.post(
        f"/v1/inspections/{s.records['in']}/review", json={"label": "good"}, headers=h)),
    ("PUT", "/v1/categories/{name}"): Call(lambda c, h, s, _: c.put("/v1/categories/keys-scratch", json=SCRATCH,
                                                                    headers=h)),
    ("DELETE", "/v1/categories/{name}"): Call(
        lambda c, h, s, _: c.delete("/v1/categories/keys-doomed", headers=h),
        prepare=lambda s: str(s.client.put("/v1/categories/keys-doomed", json=SCRATCH,
                                           headers=auth("admin")).raise_for_status().status_code)),
    ("PUT", "/v1/categories/{name}/references"): Call(lambda c, h, s, _: c.put(
        "/v1/categories/keys-refs/references", files=[("images", ("r.png", png_bytes(64, 64, seed=9), "image/png"))],
        headers=h)),
    ("DELETE", "/v1/categories/{name}/references"): Call(
        lambda c, h, s, _: c.delete("/v1/categories/keys-clear/references", headers=h)),
    ("DELETE", "/v1/categories/{name}/references/{ref_id}"): Call(
        lambda c, h, s, ref: c.delete(f"/v1/categories/keys-clear/references/{ref or 'r0'}", headers=h),
        prepare=lambda s: _put_refs(s.client, "keys-clear", 1)[-1]),
    ("POST", "/v1/categories/{name}/calibrate"): Call(lambda c, h, s, _: c.post(
        "/v1/categories/keys-refs/calibrate", headers=h)),
    ("PUT", "/v1/categories/{name}/threshold"): Call(lambda c, h, s, _: c.put(
        "/v1/categories/keys-refs/threshold", json={"threshold": 0.5}, headers=h)),
    ("POST", "/v1/categories/{name}/learn"): Call(lambda c, h, s, _: c.post(
        "/v1/categories/bottle/learn", params={"dry_run": "true"}, headers=h)),
    ("GET", "/v1/jobs/{job_id}"): Call(
        lambda c, h, s, job: c.get(f"/v1/jobs/{job or 'no-such-job'}", headers=h),
        prepare=lambda s: s.client.post("/v1/categories/keys-clear/learn", headers=auth("admin")).json()["id"]),
}


def test_every_route_is_in_the_table(server: Server) -> None:
    settings = demo_settings(**KEY_SETTINGS)
    routes = app_routes(create_app(settings, EmbeddedBackend(settings)))
    assert routes == set(ACCESS), f"routes without a row in ACCESS (and docs/records.md): {routes - set(ACCESS)}; " \
                                  f"rows without a route: {set(ACCESS) - routes}"
    assert set(CALLS) == set(ACCESS)


@pytest.mark.parametrize("route", list(ACCESS), ids=lambda r: f"{r[0]} {r[1]}")
def test_route_by_role(server: Server, route: tuple[str, str]) -> None:
    call = CALLS[route]
    got = {}
    for role in ROLES:
        made = call.prepare(server) if call.prepare is not None and role in ADMITS[ACCESS[route]] else ""
        r = call.send(server.client, auth(role), server, made)
        got[role] = (status_class(r.status_code), r.status_code, r.text[:200])
        if r.status_code in (401, 403):
            assert r.json()["error"]["code"] == {401: "unauthorized", 403: "forbidden"}[r.status_code], r.text
    want = {role: expected(route, role) for role in ROLES}
    assert {role: g[0] for role, g in got.items()} == want, got


# --- a limited key's reach at the routes ---------------------------------------------------------------------------


def _refused(r: httpx.Response) -> None:
    assert r.status_code == 403 and r.json()["error"]["code"] == "outside_key_limits", r.text


def test_a_limited_reader_sees_lists_exports_and_counts_its_own_records_only(server: Server) -> None:
    c, rec = server.client, server.records
    for role in ("limited reader", "reader"):
        ids = {i["id"] for i in c.get("/v1/inspections", params={"limit": 500}, headers=auth(role)).json()["items"]}
        assert rec["in"] in ids
        assert (ids & {rec["other source"], rec["other category"], rec["no source"]} == set()) is (role != "reader")
    mine = c.get("/v1/inspections", params={"limit": 500}, headers=auth("limited reader")).json()["items"]
    assert mine and all((i["category"], i["source"]) == ("bottle", "line-a") for i in mine)
    asked_other = c.get("/v1/inspections", params={"category": "cable"}, headers=auth("limited reader")).json()
    assert asked_other["items"] == []  # a filter cannot widen the reach
    rows = list(csv.DictReader(io.StringIO(c.get("/v1/inspections/export", headers=auth("limited reader")).text)))
    assert rows and {(r["category"], r["source"]) for r in rows} == {("bottle", "line-a")}
    assert {r["id"] for r in rows} == {i["id"] for i in mine}
    counted = c.get("/v1/stats", params={"bucket": "day"}, headers=auth("limited reader")).json()["items"]
    expected_counts = c.get("/v1/stats", params={"bucket": "day", "category": "bottle", "source": "line-a"},
                            headers=auth("reader")).json()["items"]
    assert counted == expected_counts and {i["category"] for i in counted} == {"bottle"}
    assert sum(i["inspected"] for i in counted) == len(mine)
    for what in ("other source", "other category", "no source"):
        for tail in ("", "/image", "/heatmap", "/reviews"):
            _refused(c.get(f"/v1/inspections/{rec[what]}{tail}", headers=auth("limited reader")))
            assert c.get(f"/v1/inspections/{rec[what]}{tail}", headers=auth("reader")).status_code == 200
    assert c.get("/v1/inspections/no-such-record", headers=auth("limited reader")).status_code == 404


def test_a_limited_key_reads_the_catalog_of_its_categories(server: Server) -> None:
    c = server.client
    for role in ("limited reader", "limited camera", "limited reviewer"):
        names = [x["name"] for x in c.get("/v1/categories", headers=auth(role)).json()["categories"]]
        assert names == ["bottle"], role
        for path in ("/v1/categories/cable", "/v1/categories/cable/references"):
            _refused(c.get(path, headers=auth(role)))
    _refused(c.get("/v1/categories/cable/thresholds", headers=auth("limited reader")))
    assert c.get("/v1/categories/cable/thresholds", headers=auth("reader")).status_code == 200
    assert len(c.get("/v1/categories", headers=auth("camera")).json()["categories"]) > 1


def test_a_limited_camera_inspects_its_categories_and_sources_only(server: Server) -> None:
    c = server.client
    _refused(_inspect(c, "limited camera", "cable", "line-a"))
    _refused(_inspect(c, "limited camera", "bottle", "line-b"))
    _refused(_inspect(c, "limited camera", "bottle", None))
    r = _inspect(c, "limited camera", "bottle", "line-a", seed=11)
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    wait_until(lambda: c.get(f"/v1/inspections/{rid}", headers=auth("limited reader")).status_code == 200, 30,
               what="the limited camera's record")
    assert c.get(f"/v1/inspections/{rid}", headers=auth("limited reader")).json()["key_name"] == "line-a"
    # a category within the limits that does not exist names only the key's own categories
    outside = c.post("/v1/inspect", data={"category": "cable", "source": "line-a"}, headers=auth("limited reviewer"),
                     files={"image": ("p.png", png_bytes(48, 48), "image/png")})
    _refused(outside)


def test_a_limited_reviewer_judges_its_own_records_only(server: Server) -> None:
    c, rec = server.client, server.records
    _refused(c.post(f"/v1/inspections/{rec['other category']}/review", json={"label": "good"},
                    headers=auth("limited reviewer")))
    assert c.get(f"/v1/inspections/{rec['other category']}", headers=auth("admin")).json()["review"] is None
    r = c.post(f"/v1/inspections/{rec['other source']}/review", json={"label": "defect"},
               headers=auth("limited reviewer"))  # limited to bottle only: every source of it
    assert r.status_code == 200 and r.json()["review"]["reviewer"] == "lina", r.text


def test_every_record_keeps_the_name_of_the_key_that_made_it(server: Server) -> None:
    c = server.client
    for role, name in (("camera", "cam"), ("reviewer", "rita"), ("admin", "boss")):
        rid = _inspect(c, role, seed=20).json()["request_id"]
        wait_until(lambda rid=rid: c.get(f"/v1/inspections/{rid}", headers=auth("reader")).status_code == 200, 30,
                   what="record")
        assert c.get(f"/v1/inspections/{rid}", headers=auth("reader")).json()["key_name"] == name
        rows = csv.DictReader(io.StringIO(c.get("/v1/inspections/export", headers=auth("reader")).text))
        assert {r["key_name"] for r in rows if r["id"] == rid} == {name}


# --- the limits in the records query, on both databases -------------------------------------------------------------




def _record(i: int, category: str, source: str | None) -> InspectionRecord:
    return InspectionRecord(id=f"k{i:03d}", created_ms=1_700_000_000_000 + i * 1000, category=category, score=0.9,
                            is_anomalous=i % 2 == 0, needs_review=False, threshold=0.5, threshold_source="default",
                            references=0, position=None, boxes=[], top_types=[], model_version="t", timing_ms={},
                            source=source)


def test_the_limits_are_conditions_of_the_query(store: RecordStore) -> None:
    made = [("bottle", "a"), ("bottle", "b"), ("cable", "a"), ("bottle", None), ("screw", "a"), ("bottle", "a")]
    store.insert_many([_record(i, c, s) for i, (c, s) in enumerate(made)])

    def ids(query: RecordQuery, limit: int = 100) -> list[str]:
        items, _ = store.list(query, limit)
        return sorted(r.id for r in items)

    # positional construction of the filters keeps working; the limits come last
    assert ids(RecordQuery("bottle", "a")) == ["k000", "k005"]
    assert ids(RecordQuery(allowed_categories=("bottle",), allowed_sources=("a",))) == ["k000", "k005"]
    assert ids(RecordQuery(allowed_categories=("bottle", "cable"))) == ["k000", "k001", "k002", "k003", "k005"]
    assert ids(RecordQuery(allowed_sources=("a", "b"))) == ["k000", "k001", "k002", "k004", "k005"]  # no NULL source
    assert ids(RecordQuery(category="cable", allowed_categories=("bottle",))) == []
    assert ids(RecordQuery(allowed_categories=())) == []
    page, cursor = store.list(RecordQuery(allowed_categories=("bottle",), allowed_sources=("a",)), 1)
    assert [r.id for r in page] == ["k005"] and cursor is not None  # keyset pages within the reach
    rest, _ = store.list(RecordQuery(allowed_categories=("bottle",), allowed_sources=("a",)), 1, cursor)
    assert [r.id for r in rest] == ["k000"]
    counted = store.stats(RecordQuery(allowed_categories=("bottle",), allowed_sources=("a", "b")), "day")
    assert [(r["category"], r["inspected"]) for r in counted] == [("bottle", 3)]


# --- the limits are checked at start -------------------------------------------------------------------------------


def _app(**keys: object):
    settings = demo_settings(**keys)
    return create_app(settings, EmbeddedBackend(settings))


def test_limits_on_unknown_names_or_the_admin_key_refuse_to_start() -> None:
    with pytest.raises(AuthConfigError, match=r"'suplier'.*named keys: cam, supplier.*'suplier:<secret>'"):
        _app(api_keys=["cam:c"], reader_keys=["supplier:s"], key_limits={"suplier": {"categories": ["bottle"]}})
    with pytest.raises(AuthConfigError, match="admin key"):
        _app(api_keys=["cam:c"], admin_key="boss:b", key_limits={"boss": {"categories": ["bottle"]}})
    with pytest.raises(AuthConfigError, match="no key of"):  # an open server has no keys to limit
        _app(key_limits={"cam": {"categories": ["bottle"]}})
    bare = "0123456789abcdef"  # a bare key is named by its hash, and may be limited by it
    import hashlib

    _app(api_keys=[bare], key_limits={"key-" + hashlib.sha256(bare.encode()).hexdigest()[:8]: {"sources": ["x"]}})


@pytest.mark.parametrize("limit", [{}, {"categories": []}, {"sources": []}, {"categories": [""]},
                                   {"categorie": ["bottle"]}, {"categories": "bottle"}])
def test_a_malformed_limit_is_refused_with_the_field(limit: dict) -> None:
    with pytest.raises(ValidationError, match="key_limits"):
        FiloSettings(api_keys=["cam:c"], key_limits={"cam": limit})


def test_limits_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FILO_API_KEYS", '["line-1:s1", "supplier-a-cam:s2"]')
    monkeypatch.setenv("FILO_READER_KEYS", '["supplier-a:s3"]')
    monkeypatch.setenv("FILO_KEY_LIMITS", json.dumps({
        "supplier-a-cam": {"categories": ["bottle"], "sources": ["supplier-a/line-1"]},
        "supplier-a": {"categories": ["bottle"], "sources": ["supplier-a/line-1", "supplier-a/line-2"]}}))
    settings = FiloSettings(profile="demo")
    assert settings.key_limits["supplier-a"].sources == ["supplier-a/line-1", "supplier-a/line-2"]
    from service.core.security import Authenticator

    who = Authenticator(settings).check_read("s3")
    assert (who.name, who.role, who.categories, who.sources) == \
        ("supplier-a", "reader", ("bottle",), ("supplier-a/line-1", "supplier-a/line-2"))
    assert Authenticator(settings).check_inspect("s1").limited is False


# --- the open servers answer as before -------------------------------------------------------------------------------


@pytest.mark.parametrize("admin_key", [None, "boss:boss-secret"], ids=["no keys", "admin key only"])
def test_an_open_server_admits_callers_without_a_key_as_before(admin_key: str | None) -> None:
    """Demo profile without camera, reader or reviewer keys: no key needed; with an admin key set, the anonymous
    caller inspects and reads, judging and writes need the admin key (the model is not loaded: only the key
    decisions are looked at)."""
    settings = demo_settings(admin_key=admin_key)
    app = create_app(settings, EmbeddedBackend(settings))
    c = TestClient(app, base_url="http://open", raise_server_exceptions=False)  # no lifespan: no model loaded
    for route, call in CALLS.items():
        if route[1] == "/readyz":
            continue  # the model is not loaded here: 503, and no key is involved
        r = call.send(c, {}, Server("http://open", c, {"in": "some-record"}), "")
        needs_admin = admin_key is not None and ACCESS[route] in (REVIEW, ADMIN)
        if not needs_admin:
            assert r.status_code not in (401, 403), (route, r.status_code, r.text)
        else:
            assert r.status_code == (403 if ACCESS[route] == REVIEW else 401), (route, r.text)
            assert c.request(route[0], r.request.url.path, headers=auth("admin")).status_code not in (401, 403)


# --- /metrics and the OpenAPI pages ----------------------------------------------------------------------------------


def test_metrics_key_and_docs_off_in_the_app() -> None:
    settings = demo_settings(api_keys=["cam:c"], metrics_key="prom-secret", api_docs=False)
    app = create_app(settings, EmbeddedBackend(settings))
    c = TestClient(app, base_url="http://api")
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"Authorization": "Bearer c"}).status_code == 401  # an API key is not it
    ok = c.get("/metrics", headers={"Authorization": "Bearer prom-secret"})
    assert ok.status_code == 200 and "filo_requests_total" in ok.text
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert c.get(path).status_code == 404, path
    side = create_metrics_app(create_app(demo_settings(api_keys=["cam:c"], metrics_port=9555), EmbeddedBackend(settings)))
    assert app_routes(side) == {("GET", "/metrics")}
    with pytest.raises(ValidationError, match="metrics_port"):
        demo_settings(port=9555, metrics_port=9555)


def test_filo_serve_with_a_metrics_port_and_no_docs(tmp_path: Path) -> None:
    """`filo serve` with FILO_METRICS_PORT: /metrics on that port alone (with its key), none on the API's port,
    no OpenAPI pages; SIGTERM stops both listeners. A limit on an unknown key name stops it at start (exit 2)."""
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILO_")}
    env.update({"PYTHONPATH": str(REPO), "FILO_PROFILE": "demo", "FILO_IMAGE_SIZE": "224", "FILO_GROUNDING": "false",
                "FILO_STATE_DIR": str(tmp_path), "FILO_API_KEYS": '["cam:c"]', "FILO_METRICS_PORT": str(metrics_port),
                "FILO_METRICS_KEY": "prom-secret", "FILO_API_DOCS": "false"})
    cmd = [sys.executable, "-m", "service.cli", "serve", "--embedded", "--port", str(port), "--log-level", "warning"]
    bad = subprocess.run(cmd, env={**env, "FILO_KEY_LIMITS": '{"camera-1": {"categories": ["bottle"]}}'},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'camera-1'" in bad.stderr and "named keys: cam" in bad.stderr, bad.stderr
    bad = subprocess.run(cmd, env={**env, "FILO_KEY_LIMITS": '{"cam": {"categoriess": ["bottle"]}}'},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "categoriess" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        api, metrics = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"
        wait_until(lambda: httpx.get(f"{metrics}/metrics", timeout=2).status_code == 401, 120, what="the metrics port")
        wait_until(lambda: httpx.get(f"{api}/healthz", timeout=2).status_code == 200, 60, what="the API port")
        scraped = httpx.get(f"{metrics}/metrics", headers={"Authorization": "Bearer prom-secret"}, timeout=10)
        assert scraped.status_code == 200 and "filo_requests_total" in scraped.text
        assert httpx.get(f"{api}/metrics", headers={"Authorization": "Bearer prom-secret"}).status_code == 404
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(f"{api}{path}").status_code == 404, path
        assert httpx.get(f"{metrics}/v1/categories", headers={"Authorization": "Bearer c"}).status_code == 404
        assert httpx.get(f"{api}/v1/categories").status_code == 401  # the API's routes on the API's port
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        # uvicorn stops gracefully, then raises the signal again so the process ends as a SIGTERM'd one
        assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in out, out
        for url in (api, metrics):
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
