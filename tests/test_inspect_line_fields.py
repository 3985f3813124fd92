"""What a production line needs of POST /v1/inspect: its own part id kept and searchable, its own request id so
a retry never makes a second record, a client deadline the service honours, and the key that asked on record."""

from __future__ import annotations

import csv
import io

import httpx
import pytest

from tests.service_fixtures import ServerThread, demo_settings, png_bytes, wait_ready, wait_until

KEY = {"Authorization": "Bearer secret-7"}  # the line's camera key: it inspects
READ = {"Authorization": "Bearer reader-7"}  # the records are read with a reader key


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from service.api.app import create_app
    from service.backends.embedded import EmbeddedBackend

    settings = demo_settings(state_dir=tmp_path_factory.mktemp("line-fields"), api_keys=["line7:secret-7"],
                             reader_keys=["qa:reader-7"], admin_key="admin-7")
    with ServerThread(create_app(settings, EmbeddedBackend(settings))) as srv:
        wait_ready(srv.url)
        with httpx.Client(base_url=srv.url, timeout=120, headers=READ) as c:
            yield c


def _inspect(client, **fields) -> httpx.Response:
    return client.post("/v1/inspect", data={"category": "bottle", "heatmap": "none", **fields},
                       files={"image": ("p.png", png_bytes(seed=3), "image/png")}, headers=KEY)


def test_part_id_is_kept_searchable_and_exported_with_the_key_name(client):
    r = _inspect(client, part_id="P-000123", source="line7/cam1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["part_id"] == "P-000123"
    wait_until(lambda: client.get(f"/v1/inspections/{body['request_id']}").status_code == 200, 30, what="record")
    rec = client.get(f"/v1/inspections/{body['request_id']}").json()
    assert (rec["part_id"], rec["key_name"], rec["source"]) == ("P-000123", "line7", "line7/cam1")
    assert [i["id"] for i in client.get("/v1/inspections", params={"part_id": "P-000123"}).json()["items"]] \
        == [body["request_id"]]
    assert client.get("/v1/inspections", params={"part_id": "P-999"}).json()["items"] == []
    rows = list(csv.DictReader(io.StringIO(client.get("/v1/inspections/export",
                                                      params={"part_id": "P-000123"}).text)))
    assert [(row["part_id"], row["key_name"]) for row in rows] == [("P-000123", "line7")]
    bad = _inspect(client, part_id="no spaces allowed")
    assert bad.status_code == 422 and "part_id" in bad.text


def test_a_client_chosen_request_id_makes_one_record_however_often_it_is_sent(client):
    first = _inspect(client, request_id="cam1-part-42", part_id="42")
    again = _inspect(client, request_id="cam1-part-42", part_id="42")  # a retry after a lost answer
    assert first.status_code == again.status_code == 200
    assert first.json()["request_id"] == again.json()["request_id"] == "cam1-part-42"
    assert first.headers["X-Request-Id"] == "cam1-part-42"
    wait_until(lambda: client.get("/v1/inspections/cam1-part-42").status_code == 200, 30, what="record")
    listed = client.get("/v1/inspections", params={"part_id": "42"}).json()["items"]
    assert [i["id"] for i in listed] == ["cam1-part-42"]
    assert _inspect(client, request_id="not/allowed").status_code == 422


def test_a_request_past_its_client_deadline_is_answered_504_not_run(client):
    r = _inspect(client, deadline_ms=1, request_id="too-late-1")
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert _inspect(client, deadline_ms=60_000).status_code == 200
    assert _inspect(client, deadline_ms=0).status_code == 422
    ok = client.get("/v1/inspections/too-late-1")
    assert ok.status_code == 404  # nothing answered, nothing recorded
