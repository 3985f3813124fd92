"""Bad input to the records routes is the client's mistake, answered 422 naming the field before any query runs:
never a database error (503 `records_unavailable`, or a 500) and never quietly read as something else.
A real API server (embedded mode, the demo engine) over loopback, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import event

from service.api.app import create_app
from service.backends.embedded import EmbeddedBackend
from service.records.model import Cursor
from tests.service_fixtures import ServerThread, demo_settings, wait_until

ADMIN = "admin-1"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
MAX_MS = 2**63 - 1  # the largest time a BIGINT holds




class Api:
    """A running server, and the SQL statements its records database was sent."""

    def __init__(self, client: httpx.Client, backend: EmbeddedBackend) -> None:
        self.client = client
        self.backend = backend
        self.statements: list[str] = []
        assert backend.records is not None
        event.listen(backend.records.store.engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: object, _cursor: object, statement: str, *_: object) -> None:
        if not statement.lstrip().upper().startswith("DELETE"):  # the retention purge runs beside the requests
            self.statements.append(statement)

    def refused(self, method: str, path: str, field: str, code: str = "validation_error", **kw: object) -> None:
        """`path` answers 422 `code` naming `field`, and no query reached the database for it."""
        before = len(self.statements)
        r = self.client.request(method, path, **{"headers": AUTH, **kw})  # type: ignore[arg-type]
        assert r.status_code == 422, (path, r.status_code, r.text)
        error = r.json()["error"]
        assert error["code"] == code and field in [f["field"] for f in error["fields"]], (path, error)
        assert self.statements[before:] == [], path


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    url = (f"sqlite:///{tmp_path_factory.mktemp('records-input') / 'records.db'}" if request.param == "sqlite"
           else request.getfixturevalue("module_postgres").url)
    settings = demo_settings(records_url=url, admin_key=ADMIN, thresholds={"bottle": 0.5})
    backend = EmbeddedBackend(settings)
    with ServerThread(create_app(settings, backend)) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, 120, what="embedded server ready")
        wait_until(lambda: client.get("/v1/inspections", headers=AUTH).status_code == 200, 30, what="records ready")
        yield Api(client, backend)


def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_a_cursor_past_the_largest_time_is_refused(api: Api) -> None:
    """A cursor's time must fit the BIGINT it is compared with: 2^63 is no cursor (it was a 500 on SQLite)."""
    assert _cursor(b"9223372036854775808:x") == "OTIyMzM3MjAzNjg1NDc3NTgwODp4"
    for raw in (b"9223372036854775808:x", b"%d:x" % 10**30, b"-1:x"):
        api.refused("GET", f"/v1/inspections?cursor={_cursor(raw)}", "cursor", "invalid_cursor")
    # the largest time that fits is a cursor: an empty page, not an error
    r = api.client.get(f"/v1/inspections?cursor={Cursor(MAX_MS, 'x').encode()}", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}
    assert Cursor.decode(Cursor(MAX_MS, "x").encode()) == Cursor(MAX_MS, "x")
    with pytest.raises(ValueError):
        Cursor.decode(_cursor(b"%d:x" % (MAX_MS + 1)))


def test_text_a_database_cannot_keep_is_refused_before_any_query(api: Api) -> None:
    """A NUL character (PostgreSQL's text refuses it; it was a 503 `records_unavailable` and a database warning)
    or a lone surrogate in any text that reaches the database: the review's note and defect type, the category
    filter, a cursor's record id."""
    rid = "nul-probe"
    for body, field in (({"label": "good", "note": "a\u0000b"}, "note"),
                        ({"label": "defect", "defect_type": "crack\u0000"}, "defect_type")):
        api.refused("POST", f"/v1/inspections/{rid}/review", field, json=body)
    api.refused("POST", f"/v1/inspections/{rid}/review", "note", content=b'{"label": "good", "note": "\\ud800"}',
                headers={**AUTH, "Content-Type": "application/json"})
    for path in ("/v1/inspections", "/v1/inspections/export", "/v1/stats"):
        api.refused("GET", f"{path}?category=bo%00lt", "category")
    for raw in (b"1700000000000:a\x00b", b"1700000000000:a b", b"1700000000000:" + b"x" * 65):
        api.refused("GET", f"/v1/inspections?cursor={_cursor(raw)}", "cursor", "invalid_cursor")
    # the same fields with text the database keeps are answered as usual
    assert api.client.post(f"/v1/inspections/{rid}/review", json={"label": "good", "note": "fine"},
                           headers=AUTH).status_code == 404  # no such record: the store was asked
    r = api.client.get("/v1/inspections?category=bolt", headers=AUTH)
    assert r.status_code == 200 and r.json()["items"] == []


def test_types_are_as_strict_as_the_schema(api: Api) -> None:
    """What the description calls a time, a boolean or a number is exactly that: `until=0.5` is no time (it was
    read as 1970), `"generate": 0` no boolean, `"review_margin": false` no number."""
    for path in ("/v1/inspections", "/v1/inspections/export", "/v1/stats"):
        for query, field in (("until=0.5", "until"), ("since=1700000000", "since"), ("since=-1", "since"),
                             ("reviewed=1", "reviewed"), ("needs_review=yes", "needs_review")):
            api.refused("GET", f"{path}?{query}", field)
    for body, field in (({"descriptions": ["dent"], "generate": 0}, "generate"),
                        ({"descriptions": ["dent"], "count": True}, "count"),
                        ({"descriptions": ["dent"], "count": 2.5}, "count")):
        api.refused("PUT", "/v1/categories/strict%20probe", field, json=body)
    for body, field in (({"review_margin": False}, "review_margin"), ({"threshold": True}, "threshold"),
                        ({"threshold": "0.5"}, "threshold")):
        api.refused("PUT", "/v1/categories/bottle/threshold", field, json=body)
    # what the description allows still passes: ISO-8601 times, true/false in a query, an integer as a number
    for query in ("since=2024-05-01T08:00:00Z&until=2099-01-01T00:00:00%2B02:00&reviewed=false&needs_review=true",
                  "since=2024-05-01&reviewed=true"):
        for path in ("/v1/inspections", "/v1/inspections/export", "/v1/stats"):
            assert api.client.get(f"{path}?{query}", headers=AUTH).status_code == 200, (path, query)
    r = api.client.put("/v1/categories/bottle/threshold", json={"threshold": 1, "review_margin": 0}, headers=AUTH)
    assert r.status_code == 200 and r.json()["current"]["threshold"] == 1.0, r.text
    assert api.client.put("/v1/categories/bottle/threshold", json={"threshold": None},
                          headers=AUTH).status_code == 200
    r = api.client.put("/v1/categories/strict%20probe", json={"descriptions": ["dent"], "generate": False, "count": 3},
                       headers=AUTH)
    assert r.status_code == 200, r.text
    assert api.client.delete("/v1/categories/strict%20probe", headers=AUTH).status_code == 204
