"""Inspection records and the review loop: the store on real SQLite and PostgreSQL, the API end to end
in embedded mode (a real uvicorn server with the demo engine), and the migrations against the tables."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.api.app import create_app
from service.backends.embedded import EmbeddedBackend
from service.records.db import migrate, open_engine
from service.records.model import Artefact, Cursor, InspectionRecord, RecordQuery, Review, now_ms
from service.records.schema import metadata
from service.records.store import RecordStore
from tests.conftest import synthetic_image
from tests.postgres_server import PostgresServer
from tests.service_fixtures import ServerThread, demo_settings, learn_and_wait, png_bytes, wait_until

API, REVIEWER, ADMIN = "cam-1", "rev-secret", "admin-1"
AUTH = {"Authorization": f"Bearer {API}"}
REV = {"Authorization": f"Bearer {REVIEWER}"}
ADM = {"Authorization": f"Bearer {ADMIN}"}
READER = "qa-1"  # camera keys inspect; records are read with a reader key
READ = {"Authorization": f"Bearer {READER}"}
HOUR = 3_600_000




def _record(i: int, created_ms: int, category: str = "bottle", ng: bool = False, source: str | None = "line-1",
            arts: bool = False) -> InspectionRecord:
    return InspectionRecord(
        id=f"r{i:04d}", created_ms=created_ms, category=category, score=0.9 if ng else 0.1, is_anomalous=ng,
        needs_review=False, threshold=0.5, threshold_source="default", references=0, position=None,
        boxes=[{"x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0, "phrase": "crack", "confidence": 0.5, "valid": True}],
        top_types=[{"description": "=HYPERLINK(\"x\")", "similarity": 0.3}], model_version="m1",
        timing_ms={"total": 1.0}, source=source,
        artefacts=[Artefact("image", "image/png", b"png-%d" % i)] if arts else [])


# --- the store, on both databases ---------------------------------------------------------------------------


def test_migrated_schema_matches_the_tables(store: RecordStore) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    migrate(store.engine)  # again: nothing to do, no error


def test_insert_is_idempotent_on_the_id(store: RecordStore) -> None:
    t = now_ms()
    records = [_record(i, t + i, arts=True) for i in range(5)]
    assert store.insert_many(records + records[:2]) == 5  # duplicates within one batch too
    assert store.insert_many(records) == 0
    assert store.count() == 5
    assert store.artefact("r0003", "image").data == b"png-3"
    assert store.artefact("r0003", "heatmap") is None
    got = store.get("r0002")
    assert got is not None and got.has_image and not got.has_heatmap and got.boxes[0]["phrase"] == "crack"


def test_the_heatmap_kind_round_trips(store: RecordStore) -> None:
    from dataclasses import replace

    t = now_ms()
    heat = [Artefact("image", "image/png", b"png"), Artefact("heatmap", "image/png", b"heat")]
    plan = {"k-map": ("map", heat), "k-overlay": ("overlay", heat),
            "k-old": (None, heat),  # kept before the kind was recorded
            "k-stripped": ("map", [])}  # travelled without its artefacts (a long outage)
    store.insert_many([replace(_record(i, t + i, ng=True), id=rid, heatmap_kind=kind, artefacts=arts)
                       for i, (rid, (kind, arts)) in enumerate(plan.items())])
    got = {rid: store.get(rid) for rid in plan}
    assert {rid: (r.has_heatmap, r.heatmap_kind) for rid, r in got.items()} == {
        "k-map": (True, "map"), "k-overlay": (True, "overlay"),
        "k-old": (True, None),  # unknown, not guessed
        "k-stripped": (False, None),  # no heatmap kept, so no kind
    }
    assert got["k-map"].out()["heatmap_kind"] == "map" and got["k-old"].out()["heatmap_kind"] is None
    listed = {r.id: r.heatmap_kind for r in store.list(RecordQuery(), 10)[0]}
    assert listed == {rid: r.heatmap_kind for rid, r in got.items()}


def _wire(record: InspectionRecord) -> dict[bytes, bytes]:
    """An entry as Redis hands it back: the field names as bytes."""
    return {k.encode(): v for k, v in record.to_wire().items()}


def test_the_heatmap_kind_on_the_wire() -> None:
    import json
    from dataclasses import replace

    record = _record(1, now_ms(), ng=True)
    record.artefacts = [Artefact("image", "image/png", b"png"), Artefact("heatmap", "image/png", b"heat")]
    record.heatmap_kind = "map"
    entry = _wire(record)
    assert entry[b"heatmap:kind"] == b"map"
    # not in the metadata: an older pod draining the stream takes its keys as the record's fields
    assert "heatmap_kind" not in json.loads(entry[b"meta"])
    back = InspectionRecord.from_wire(entry)
    assert back == record
    assert InspectionRecord.from_wire(_wire(replace(record, heatmap_kind="overlay"))).heatmap_kind == "overlay"
    # an entry written before the kind was recorded still loads, kind unknown
    del entry[b"heatmap:kind"]
    assert InspectionRecord.from_wire(entry) == replace(record, heatmap_kind=None)
    # a record that travels without its artefacts (a long outage) carries no kind either
    stripped = _wire(replace(record, artefacts=[]))
    assert b"heatmap:kind" not in stripped and InspectionRecord.from_wire(stripped).heatmap_kind is None
    # a kind this version does not know: the record is kept, its kind unknown
    assert InspectionRecord.from_wire({**_wire(record), b"heatmap:kind": b"sepia"}).heatmap_kind is None


def test_an_entry_from_a_newer_pod_still_loads() -> None:
    """A pod of an older version draining the stream meets metadata keys it does not know: it keeps the record
    and the fields it knows rather than dropping the entry as unreadable."""
    import json

    record = _record(2, now_ms(), ng=True)
    record.artefacts = [Artefact("image", "image/png", b"png")]
    entry = _wire(record)
    entry[b"meta"] = json.dumps({**json.loads(entry[b"meta"]), "camera_exposure_us": 800}).encode()
    assert InspectionRecord.from_wire(entry) == record


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path: Path) -> Iterator[str]:
    """The URL of a database no migration has touched yet."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'records.db'}"
        return
    from sqlalchemy import create_engine, text

    server: PostgresServer = request.getfixturevalue("module_postgres")
    admin = create_engine(server.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS filo_upgrade"))
        conn.execute(text("CREATE DATABASE filo_upgrade"))
    admin.dispose()
    yield server.url.rsplit("/", 1)[0] + "/filo_upgrade"


def test_migrations_upgrade_a_0002_database_with_rows(empty_database: str) -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect, text

    from service.records.db import alembic_config
    from service.records.schema import artefacts, inspections

    def version(engine) -> str:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()

    def columns(engine) -> set[str]:
        return {c["name"] for c in inspect(engine).get_columns("inspections")}

    engine = open_engine(empty_database)
    try:
        migrate(engine, "0002_catalog")
        assert version(engine) == "0002_catalog" and "heatmap_kind" not in columns(engine)
        old = _record(1, now_ms() - HOUR, ng=True)
        row = {c.name: getattr(old, c.name) for c in inspections.columns
               if c.name not in ("heatmap_kind", "part_id", "key_name", "review_label", "review_defect_type", "review_note", "reviewer",
                                 "reviewed_ms")} | {"has_image": True, "has_heatmap": True}
        with engine.begin() as conn:  # rows as a 0002 server wrote them
            conn.execute(inspections.insert(), [row, {**row, "id": "r-plain", "has_image": False,
                                                      "has_heatmap": False}])
            conn.execute(artefacts.insert(), [{"inspection_id": old.id, "kind": "heatmap", "media_type": "image/png",
                                               "data": b"grey"}])
        migrate(engine)
        assert version(engine) == "0004_part_id_key"
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        store = RecordStore(engine)
        kept = store.get(old.id)
        assert kept is not None and kept.has_heatmap and kept.heatmap_kind is None  # older rows stay NULL
        assert kept.part_id is None and kept.key_name is None
        assert (kept.category, kept.score, kept.boxes, kept.source) == (old.category, old.score, old.boxes, old.source)
        assert store.get("r-plain").heatmap_kind is None and store.artefact(old.id, "heatmap").data == b"grey"
        new = _record(2, now_ms(), ng=True)
        new.artefacts, new.heatmap_kind = [Artefact("heatmap", "image/png", b"map")], "map"
        new.part_id, new.key_name = "P-0042", "line7"
        assert store.insert_many([new]) == 1 and store.get(new.id).heatmap_kind == "map"
        assert (store.get(new.id).part_id, store.get(new.id).key_name) == ("P-0042", "line7")
        assert [r.id for r in store.list(RecordQuery(part_id="P-0042"), 10, None)[0]] == [new.id]

        cfg = alembic_config(empty_database)  # and back down, rows kept
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0002_catalog")
        assert version(engine) == "0002_catalog" and "heatmap_kind" not in columns(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM inspections")).scalar_one() == 3
    finally:
        engine.dispose()


def test_keyset_pages_newest_first_and_filters(store: RecordStore) -> None:
    t = now_ms() - 10 * HOUR
    records = [_record(i, t + (i // 2) * 1000, category="bottle" if i % 3 else "cable", ng=i % 4 == 0,
                       source=f"line-{i % 2}") for i in range(25)]  # pairs share a millisecond: ties by id
    store.insert_many(records)
    seen, cursor = [], None
    while True:
        page, cursor = store.list(RecordQuery(), 10, cursor)
        seen += [r.id for r in page]
        if cursor is None:
            break
        assert Cursor.decode(cursor.encode()) == cursor
    expected = [r.id for r in sorted(records, key=lambda r: (r.created_ms, r.id), reverse=True)]
    assert seen == expected
    assert {r.id for r in store.list(RecordQuery(category="cable"), 100)[0]} == \
        {r.id for r in records if r.category == "cable"}
    assert {r.id for r in store.list(RecordQuery(verdict="ng", source="line-0"), 100)[0]} == \
        {r.id for r in records if r.is_anomalous and r.source == "line-0"}
    window = store.list(RecordQuery(since_ms=t + 3000, until_ms=t + 6000), 100)[0]
    assert {r.id for r in window} == {r.id for r in records if t + 3000 <= r.created_ms < t + 6000}


def test_reviews_replace_the_judgement_and_keep_the_history(store: RecordStore) -> None:
    store.insert_many([_record(1, now_ms(), ng=True)])
    store.review("r0001", Review("good", None, "a reflection", "anna", now_ms()))
    judged = store.review("r0001", Review("defect", "scratch", None, "ben", now_ms() + 1))
    assert judged is not None and judged.review.label == "defect" and judged.review.reviewer == "ben"
    assert [(r.label, r.reviewer) for r in store.reviews("r0001")] == [("good", "anna"), ("defect", "ben")]
    assert store.review("nope", Review("good", None, None, "anna", now_ms())) is None
    assert [r.id for r in store.list(RecordQuery(reviewed=True), 10)[0]] == ["r0001"]
    assert store.list(RecordQuery(reviewed=False), 10)[0] == []


def test_stats_per_bucket_and_category(store: RecordStore) -> None:
    day0 = (now_ms() // 86_400_000 - 1) * 86_400_000
    rows = [  # (hour, category, ng, review)
        (0, "bottle", True, "defect"), (0, "bottle", True, "good"), (0, "bottle", False, "defect"),
        (0, "bottle", False, None), (1, "bottle", True, None), (1, "cable", False, "good"), (25, "bottle", True, None),
    ]
    store.insert_many([_record(i, day0 + h * HOUR + 5, category=c, ng=ng) for i, (h, c, ng, _) in enumerate(rows)])
    for i, (_, _, _, label) in enumerate(rows):
        if label:
            store.review(f"r{i:04d}", Review(label, None, None, "anna", now_ms()))
    hourly = {(r["bucket_ms"], r["category"]): r for r in store.stats(RecordQuery(), "hour")}
    first = hourly[(day0, "bottle")]
    assert (first["inspected"], first["ng"], first["reviewed"], first["confirmed_defects"], first["false_alarms"],
            first["misses"]) == (4, 2, 3, 1, 1, 1)
    assert hourly[(day0 + HOUR, "cable")]["reviewed"] == 1 and len(hourly) == 4
    daily = {(r["bucket_ms"], r["category"]): r["inspected"] for r in store.stats(RecordQuery(), "day")}
    assert daily == {(day0, "bottle"): 5, (day0, "cable"): 1, (day0 + 86_400_000, "bottle"): 1}


def test_purge_deletes_only_records_past_the_retention(store: RecordStore) -> None:
    now = now_ms()
    retention = 90 * 86_400_000
    store.insert_many([_record(1, now - retention - 1, arts=True), _record(2, now - retention + 1000, arts=True),
                       _record(3, now)])
    store.review("r0001", Review("good", None, None, "anna", now))
    assert store.purge(retention, now) == 1
    assert store.get("r0001") is None and store.artefact("r0001", "image") is None and store.reviews("r0001") == []
    assert store.get("r0002") is not None and store.artefact("r0002", "image") is not None
    assert store.purge(retention, now) == 0


# --- the API in embedded mode -------------------------------------------------------------------------------


def _settings(state_dir: Path, **kw: object):
    base: dict[str, object] = {"state_dir": state_dir, "api_keys": [API], "reviewer_keys": [f"anna:{REVIEWER}"],
                               "reader_keys": [f"qa:{READER}"], "admin_key": ADMIN, "records_keep": "all",
                               "thresholds": {"bottle": 0.5}}
    base.update(kw)
    return demo_settings(**base)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, EmbeddedBackend]]:
    settings = _settings(tmp_path_factory.mktemp("records-api"))
    backend = EmbeddedBackend(settings)
    with ServerThread(create_app(settings, backend)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 120, what="embedded server ready")
        yield c, backend


def _inspect(client: httpx.Client, image: bytes, category: str = "bottle", **fields: str) -> dict:
    r = client.post("/v1/inspect", data={"category": category, **fields}, files={"image": ("x.png", image)},
                    headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def _wait_record(client: httpx.Client, record_id: str) -> dict:
    wait_until(lambda: client.get(f"/v1/inspections/{record_id}", headers=READ).status_code == 200, 10,
               what=f"record {record_id}")
    return client.get(f"/v1/inspections/{record_id}", headers=READ).json()


def test_every_inspection_is_recorded_with_what_was_answered(api) -> None:
    client, _ = api
    image = png_bytes(80, 100, seed=3)
    body = _inspect(client, image, source="line-7/cam:2", heatmap="none")
    assert body["heatmap"] is None  # the record may keep a heatmap; the client who asked none gets none
    rec = _wait_record(client, body["request_id"])
    for key in ("category", "score", "is_anomalous", "needs_review", "threshold", "threshold_source", "references",
                "position", "top_types"):
        assert rec[key] == body[key], key
    assert rec["source"] == "line-7/cam:2" and rec["model_version"] == body["model"]["version"]
    assert rec["has_image"] and rec["has_heatmap"] and rec["review"] is None
    img = client.get(f"/v1/inspections/{body['request_id']}/image", headers=READ)
    assert img.status_code == 200 and img.content == image and img.headers["content-type"] == "image/png"
    heat = client.get(f"/v1/inspections/{body['request_id']}/heatmap", headers=READ)
    assert heat.status_code == 200 and heat.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(heat.content)).size == (224, 224)
    assert rec["heatmap_kind"] == "overlay"  # the record's own JPEG is an overlay
    # record=false leaves nothing
    quiet = _inspect(client, image, record="false")
    time.sleep(0.5)
    assert client.get(f"/v1/inspections/{quiet['request_id']}", headers=READ).status_code == 404


def test_the_record_says_which_heatmap_it_kept(api) -> None:
    client, _ = api
    image = png_bytes(64, 48, seed=4)
    for asked, kind, media in (("map", "map", "image/png"), ("png", "overlay", "image/png"),
                               ("jpeg", "overlay", "image/jpeg")):
        body = _inspect(client, image, heatmap=asked, source=f"kind-{asked}")
        assert body["heatmap"]["kind"] == kind
        rec = _wait_record(client, body["request_id"])
        assert (rec["has_heatmap"], rec["heatmap_kind"]) == (True, kind), asked
        heat = client.get(f"/v1/inspections/{body['request_id']}/heatmap", headers=READ)
        assert heat.headers["content-type"] == media
        if kind == "map":
            assert Image.open(io.BytesIO(heat.content)).mode == "L"  # the raw 8-bit map, as the client got it
        listed = client.get(f"/v1/inspections?source=kind-{asked}", headers=READ).json()["items"]
        assert [(i["id"], i["heatmap_kind"]) for i in listed] == [(body["request_id"], kind)]


def test_bad_input_is_refused_clearly(api) -> None:
    client, _ = api
    for bad in ("line 7", "x" * 65, "<b>", "line;7"):
        r = client.post("/v1/inspect", data={"category": "bottle", "source": bad},
                        files={"image": ("x.png", png_bytes(32, 32))}, headers=AUTH)
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "source", bad
    for query, field in (("verdict=maybe", "verdict"), ("limit=501", "limit"), ("limit=0", "limit"),
                         ("since=yesterday", "since"), ("reviewed=perhaps", "reviewed"), ("cursor=%%%", "cursor"),
                         ("bucket=week", "bucket")):
        path = "/v1/stats" if field == "bucket" else "/v1/inspections"
        r = client.get(f"{path}?{query}", headers=READ)
        assert r.status_code == 422, (query, r.text)
        assert field in r.text, query
    assert client.get("/v1/inspections/unknown-id", headers=READ).json()["error"]["code"] == "unknown_inspection"
    assert client.get("/v1/inspections/unknown-id/image", headers=READ).status_code == 404
    assert client.get("/v1/inspections").status_code == 401
    r = client.post("/v1/inspections/unknown-id/review", json={"label": "good"}, headers=REV)
    assert r.status_code == 404


def test_review_roles_names_and_history(api) -> None:
    client, _ = api
    rid = _inspect(client, png_bytes(60, 60, seed=5))["request_id"]
    _wait_record(client, rid)
    r = client.post(f"/v1/inspections/{rid}/review", json={"label": "good"}, headers=AUTH)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"  # a camera key may not judge
    assert client.post(f"/v1/inspections/{rid}/review", json={"label": "bad"}, headers=REV).status_code == 422
    note = "<script>alert(1)</script>"
    r = client.post(f"/v1/inspections/{rid}/review", json={"label": "good", "note": note}, headers=REV)
    assert r.status_code == 200, r.text
    assert r.json()["review"]["reviewer"] == "anna" and r.json()["review"]["note"] == note  # kept as text
    r = client.post(f"/v1/inspections/{rid}/review", json={"label": "defect", "defect_type": "scratch"}, headers=ADM)
    assert r.status_code == 200 and r.json()["review"]["label"] == "defect"
    admin_name = r.json()["review"]["reviewer"]
    assert admin_name.startswith("key-") and ADMIN not in admin_name  # a bare key: a short hash, not the key
    history = client.get(f"/v1/inspections/{rid}/reviews", headers=READ).json()["items"]
    assert [(h["label"], h["reviewer"]) for h in history] == [("good", "anna"), ("defect", admin_name)]


def test_list_stats_and_export(api) -> None:
    client, _ = api
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1))
    ids = [_inspect(client, png_bytes(40, 40, seed=10 + i), category="cable", source="line-9")["request_id"]
           for i in range(3)]
    for rid in ids:
        _wait_record(client, rid)
    page = client.get(f"/v1/inspections?category=cable&source=line-9&since={since}&limit=2", headers=READ).json()
    assert [r["id"] for r in page["items"]] == ids[::-1][:2] and page["next_cursor"]
    rest = client.get(f"/v1/inspections?category=cable&source=line-9&limit=2&cursor={page['next_cursor']}",
                      headers=READ).json()
    assert [r["id"] for r in rest["items"]] == [ids[0]] and rest["next_cursor"] is None
    before = client.get("/v1/stats?category=cable&bucket=day", headers=READ).json()["items"]
    assert sum(i["inspected"] for i in before) == 3 and sum(i["reviewed"] for i in before) == 0
    client.post(f"/v1/inspections/{ids[0]}/review", json={"label": "defect"}, headers=REV)
    after = client.get("/v1/stats?category=cable&bucket=hour", headers=READ).json()
    assert after["bucket"] == "hour" and sum(i["reviewed"] for i in after["items"]) == 1
    export = client.get("/v1/inspections/export?category=cable", headers=READ)
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert [r["id"] for r in rows] == ids[::-1]
    assert all(r["source"] == "line-9" for r in rows)
    assert all(not r["top_type"].startswith(("=", "+", "-", "@")) for r in rows)


def test_formula_cells_are_neutralised() -> None:
    from service.api.routes.inspections import _cell

    assert [_cell(v) for v in ("=1+1", "+cmd", "-2", "@x", "safe", 0.5)] == ["'=1+1", "'+cmd", "'-2", "'@x", "safe",
                                                                         "0.5"]


def test_manual_threshold_review_band_and_history(api) -> None:
    client, _ = api
    image = png_bytes(50, 50, seed=21)
    score = _inspect(client, image, category="screw")["score"]
    r = client.put("/v1/categories/screw/threshold", json={"threshold": round(score + 0.01, 6),
                                                           "review_margin": 0.05}, headers=REV)
    assert r.status_code == 403
    r = client.put("/v1/categories/screw/threshold", json={"threshold": round(score + 0.01, 6),
                                                           "review_margin": 0.05}, headers=ADM)
    assert r.status_code == 200, r.text
    assert r.json()["current"] == {"threshold": round(score + 0.01, 6), "source": "manual", "review_margin": 0.05}
    body = _inspect(client, image, category="screw")
    assert body["threshold_source"] == "manual" and not body["is_anomalous"] and body["needs_review"]
    rec = _wait_record(client, body["request_id"])
    assert rec["needs_review"]
    queue = client.get("/v1/inspections?category=screw&needs_review=true&reviewed=false", headers=READ).json()
    assert body["request_id"] in [i["id"] for i in queue["items"]]
    client.put("/v1/categories/screw/threshold", json={"threshold": None}, headers=ADM)
    hist = client.get("/v1/categories/screw/thresholds", headers=READ).json()
    assert hist["current"]["source"] == "default" and hist["current"]["review_margin"] == 0.05
    assert [h["source"] for h in hist["history"]] == ["removed", "manual"]
    assert hist["history"][1]["previous"] == 0.5 and hist["history"][0]["previous"] == round(score + 0.01, 6)
    assert {h["actor"] for h in hist["history"]} == {hist["history"][0]["actor"]}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_learn_turns_judgements_into_references_a_threshold_and_suggestions(api) -> None:
    learn_loop(api[0])


def learn_loop(client: httpx.Client) -> None:
    """Judge four NG results (three false alarms, one defect), see the counts, learn: shared by both modes."""
    category = "carpet"
    client.put(f"/v1/categories/{category}/threshold", json={"threshold": 0.0}, headers=ADM)  # everything is NG
    goods = [_png(synthetic_image(120, 120, seed=500 + i)) for i in range(3)]
    defect = _png(np.zeros((120, 120, 3), np.uint8) + 255)
    ids = [_inspect(client, im, category=category)["request_id"] for im in [*goods, defect]]
    for rid in ids:
        assert _wait_record(client, rid)["is_anomalous"]
    for rid in ids[:3]:
        client.post(f"/v1/inspections/{rid}/review", json={"label": "good"}, headers=REV)
    client.post(f"/v1/inspections/{ids[3]}/review", json={"label": "defect", "defect_type": "Burn mark"}, headers=REV)
    counts = client.get(f"/v1/stats?category={category}&bucket=day", headers=READ).json()["items"]
    assert [(c["ng"], c["reviewed"], c["false_alarms"], c["confirmed_defects"]) for c in counts] == [(4, 4, 3, 1)]
    plan = client.post(f"/v1/categories/{category}/learn?dry_run=true", headers=ADM)
    assert plan.status_code == 200, plan.text
    plan = plan.json()
    assert plan["dry_run"] and plan["references_added"] == 3 and plan["suggested_descriptions"] == ["Burn mark"]
    assert client.get(f"/v1/categories/{category}/references", headers=AUTH).json()["references"] == 0
    assert client.post(f"/v1/categories/{category}/learn", headers=REV).status_code == 403
    done = learn_and_wait(client, category, ADM)
    assert not done["dry_run"] and done["references"] == 3 and done["threshold"]["source"] == "learned"
    assert (done["threshold"]["n_good"], done["threshold"]["n_defective"]) == (3, 1)
    assert client.get(f"/v1/categories/{category}/references", headers=AUTH).json()["references"] == 3
    after = _inspect(client, goods[0], category=category)
    assert after["threshold_source"] == "learned" and after["threshold"] == pytest.approx(done["threshold"]["after"])
    assert after["references"] == 3
    hist = client.get(f"/v1/categories/{category}/thresholds", headers=READ).json()["history"]
    assert hist[0]["source"] == "learned" and hist[0]["threshold"] == pytest.approx(done["threshold"]["after"])
    # the descriptions are suggestions only: the category is unchanged
    assert "Burn mark" not in client.get(f"/v1/categories/{category}", headers=AUTH).json()["descriptions"]


def test_keep_policy_decides_the_artefacts() -> None:
    from service.records.policy import keeps_artefacts

    assert keeps_artefacts("ng", 0.0, True) and not keeps_artefacts("ng", 0.0, False)
    assert keeps_artefacts("ng", 0.01, False, draw=lambda: 0.005)
    assert not keeps_artefacts("ng", 0.01, False, draw=lambda: 0.5)
    assert keeps_artefacts("all", 0.0, False) and not keeps_artefacts("none", 1.0, True)


def test_the_purge_runs_by_itself(tmp_path: Path) -> None:
    import asyncio

    from service.core.telemetry import Metrics
    from service.records.recorder import Records

    settings = demo_settings(records_retention_days=1.0, records_purge_interval_s=0.2)
    url = f"sqlite:///{tmp_path / 'records.db'}"

    async def scenario() -> tuple[int, list[str]]:
        records = Records(settings, Metrics(), url)
        await records.start()
        while not records.ready:
            await asyncio.sleep(0.05)
        day = 86_400_000
        await records.write([_record(1, now_ms() - day - 60_000), _record(2, now_ms() - day + 60_000)])
        for _ in range(50):  # up to 5 s
            if records.store.count() == 1:
                break
            await asyncio.sleep(0.1)
        left = [r.id for r in records.store.list(RecordQuery(), 10)[0]]
        await records.stop()
        return records.store.count(), left

    count, left = asyncio.run(scenario())
    assert (count, left) == (1, ["r0002"])  # past the retention gone; a minute younger than it kept


def test_records_buffer_keeps_what_it_could_not_write_and_says_so() -> None:
    import asyncio

    from service.core.telemetry import Metrics
    from service.records.buffer import RecordBuffer

    written: list[str] = []
    state = {"down": True}

    async def flush(batch: list[InspectionRecord]) -> None:
        if state["down"]:
            raise ConnectionError("database away")
        written.extend(r.id for r in batch)

    async def scenario() -> tuple[float, float, float]:
        metrics = Metrics()
        buf = RecordBuffer(flush, metrics, batch=3, max_items=5)
        for i in range(7):  # two more than it holds: the two oldest go, counted
            buf.submit(_record(i, now_ms()))
        assert not await buf.flush_once()
        pending = metrics.records_pending._value.get()
        state["down"] = False
        while await buf.flush_once() and len(buf):
            pass
        dropped = metrics.records_failed.labels(reason="dropped")._value.get()
        retried = metrics.records_failed.labels(reason="retried")._value.get()
        return pending, dropped, retried

    pending, dropped, retried = asyncio.run(scenario())
    assert (pending, dropped, retried) == (5, 2, 3)
    assert written == [f"r{i:04d}" for i in range(2, 7)]
