"""The console's Review and Trends views and the admin threshold/learn controls, in a real headless Chromium.

Embedded mode (SQLite records) and queue mode (Redis, a worker, a real PostgreSQL): results made NG by a
threshold set by hand are judged with one key each, leave the queue, change the Trends counts, and Learn
from reviews (a dry run, then applied) turns the false alarms into references. Hostile text (a source and a
note with markup) stays text. Records written straight into the SQLite file at chosen past times check the
Trends counts and charts per hour and day, since/until typed in a UTC+05:30 browser, and Load more (queue and
records). Every wait is bounded; screenshots land in out/console/.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from service.api.app import create_app
from service.backends.embedded import EmbeddedBackend
from service.records.db import open_engine
from service.records.model import Artefact, InspectionRecord, Review, now_ms
from service.records.store import RecordStore
from tests.postgres_server import PostgresServer, postgres  # noqa: F401
from tests.service_fixtures import (  # noqa: F401
    RedisServer,
    ServerThread,
    WorkerPool,
    demo_settings,
    redis_server,
    wait_ready,
    wait_until,
    worker_pool,
)
from tests.test_console_browser import (  # noqa: F401
    API_KEY,
    HOSTILE,
    SAMPLES,
    _browser_installed,
    all_by_testid,
    api_requests,
    assert_no_alert,
    by_testid,
    csp_violations,
    downloads,
    driver,
    good_variants,
    hostile_descriptions,
    open_console,
    queue_server,
    read_download,
    shot,
)

pytestmark = pytest.mark.slow

REVIEWER_KEY = "rev-secret"
READER_KEY = "dash-secret"  # the console reads the records with it (a camera key inspects only)
ADMIN_SECRET = "console-admin"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
READ = {"Authorization": f"Bearer {READER_KEY}"}
REV = {"Authorization": f"Bearer {REVIEWER_KEY}"}
ADM = {"Authorization": f"Bearer {ADMIN_SECRET}"}
HOSTILE_SOURCE = "<img src=x onerror=alert(2)>"  # the API refuses it; a record written behind its back has it


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("review-state")


PAGED = "crate"  # a category only the paged review queue test writes records of
KINDS = "tray"  # a category only the heatmap kind test has records of


@pytest.fixture(scope="module")
def paged_descriptions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("review-desc") / "paged.json"
    path.write_text(json.dumps({
        "format": "filo-descriptions/v1", "dataset": "paged",
        "categories": [{"name": PAGED, "noun": "wooden crate", "descriptions": ["split plank", "bent nail"]},
                       {"name": KINDS, "noun": "metal tray", "descriptions": ["dent", "rust spot"]}],
    }))
    return path


@pytest.fixture(scope="module")
def server(state_dir: Path, hostile_descriptions: Path, paged_descriptions: Path  # noqa: F811
           ) -> Iterator[ServerThread]:
    settings = demo_settings(
        state_dir=state_dir, api_keys=[API_KEY], reviewer_keys=[f"rita:{REVIEWER_KEY}"],
        reader_keys=[f"dana:{READER_KEY}"], admin_key=f"boss:{ADMIN_SECRET}",
        descriptions=[SAMPLES / "descriptions.json", hostile_descriptions, paged_descriptions],
    )
    with ServerThread(create_app(settings, EmbeddedBackend(settings))) as srv:
        wait_ready(srv.url)
        yield srv


# --- helpers -------------------------------------------------------------------------------------------------


def wait_for(drv: WebDriver, condition, what: str, timeout: float = 60):
    """A bounded wait that looks again when the page redrew what it was reading (lists load afresh)."""
    return WebDriverWait(drv, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                         ).until(condition, message=what)


HISTORY_JS = """return [...document.querySelectorAll('[data-testid="threshold-change"]')].map(li => ({
  text: li.innerText, values: li.querySelector('[data-testid="threshold-change-values"]').textContent,
  who: li.querySelector('[data-testid="threshold-change-who"]').textContent}))"""


def history(drv: WebDriver) -> list[dict]:
    """The threshold history as shown, newest first (read in one script)."""
    return drv.execute_script(HISTORY_JS)


def make_ng(client: httpx.Client, category: str) -> None:
    """A threshold of 0 by hand: every result of the category is NG."""
    r = client.put(f"/v1/categories/{category}/threshold", json={"threshold": 0.0}, headers=ADM)
    assert r.status_code == 200, r.text


def inspect_files(client: httpx.Client, category: str, files: list[Path], source: str) -> list[str]:
    ids = []
    for path in files:
        r = client.post("/v1/inspect", headers=AUTH, data={"category": category, "source": source},
                        files={"image": (path.name, path.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["is_anomalous"]
        ids.append(r.json()["request_id"])
    return ids


def wait_records(client: httpx.Client, category: str, n: int, timeout: float = 60) -> list[str]:
    """Records arrive off the request's path (a writer task, or the Redis stream): a bounded wait."""
    box: list[str] = []

    def arrived() -> bool:
        r = client.get(f"/v1/inspections?category={category}&reviewed=false&limit=500", headers=READ)
        box[:] = [i["id"] for i in r.json()["items"]] if r.status_code == 200 else []
        return len(box) == n

    wait_until(arrived, timeout, interval=0.2, what=f"{n} {category} records")
    return box


def tab(drv: WebDriver, view: str) -> None:
    by_testid(drv, f"tab-{view}").click()
    wait_for(drv, lambda d: by_testid(d, f"view-{view}").is_displayed(), f"the {view} view", timeout=10)


# Read in one script (the lists are drawn afresh while they load: element handles would go stale).
ROWS_JS = """return [...document.querySelectorAll(`[data-testid="${arguments[0]}"]`)].map(r => Object.assign(
  Object.fromEntries([...r.querySelectorAll("[data-col]")].map(c => [c.dataset.col, c.textContent])),
  {_id: r.dataset.id || null, _selected: r.getAttribute("aria-selected") === "true"}))"""


def rows(drv: WebDriver, testid: str) -> list[dict]:
    return drv.execute_script(ROWS_JS, testid)


def queue_ids(drv: WebDriver) -> list[str]:
    return [r["_id"] for r in rows(drv, "review-item")]


def selected_id(drv: WebDriver) -> str | None:
    return next((r["_id"] for r in rows(drv, "review-item") if r["_selected"]), None)


def open_review(drv: WebDriver, category: str, n: int) -> list[str]:
    tab(drv, "review")
    Select(by_testid(drv, "review-category")).select_by_value(category)
    wait_for(drv, lambda d: len(queue_ids(d)) == n and by_testid(d, "review-id").text == queue_ids(d)[0],
             f"{n} results waiting for review", timeout=30)
    return queue_ids(drv)


def press(drv: WebDriver, key: str) -> None:
    """A key press on the page itself (nothing focused that takes text)."""
    drv.execute_script("document.activeElement && document.activeElement.blur()")
    drv.find_element(By.TAG_NAME, "body").send_keys(key)


def judge_by_key(drv: WebDriver, key: str) -> None:
    before = queue_ids(drv)
    current = selected_id(drv)
    press(drv, key)
    wait_for(drv, lambda d: current not in queue_ids(d) and len(queue_ids(d)) == len(before) - 1,
             f"{current} judged with {key!r} and gone from the queue", timeout=20)
    if len(before) > 1:  # the next one is selected (the one before, at the end)
        i = before.index(current)
        nxt = before[i + 1] if i + 1 < len(before) else before[i - 1]
        wait_for(drv, lambda d: selected_id(d) == nxt and by_testid(d, "review-id").text == nxt,
                 "the next result selected", timeout=10)


def trends_totals(drv: WebDriver, category: str) -> dict[str, str]:
    """The Trends view's totals row of `category` (bucket per day), after it has loaded afresh."""
    tab(drv, "trends")
    Select(by_testid(drv, "trends-bucket")).select_by_value("day")
    Select(by_testid(drv, "trends-category")).select_by_value(category)
    by_testid(drv, "trends-apply").click()
    wait_for(drv, lambda d: any(r["category"] == category for r in rows(d, "trends-total")), "the trends counts",
             timeout=20)
    return next(r for r in rows(drv, "trends-total") if r["category"] == category)


def wait_totals(drv: WebDriver, category: str, **expected: str) -> dict[str, str]:
    box: dict[str, str] = {}

    def matches(d: WebDriver) -> bool:
        box.update(trends_totals(d, category))
        return all(box.get(k) == v for k, v in expected.items())

    try:
        wait_for(drv, matches, f"trends totals {expected}", timeout=30)
    except Exception as exc:
        raise AssertionError(f"trends totals {box} != {expected}") from exc
    return box


def open_admin(drv: WebDriver, category: str, admin_key: str) -> None:
    tab(drv, "inspect")
    Select(by_testid(drv, "category")).select_by_value(category)
    admin = by_testid(drv, "admin")
    if not admin.get_attribute("open"):
        drv.find_element(By.CSS_SELECTOR, '[data-testid="admin"] > summary').click()
    field = by_testid(drv, "admin-key")
    field.clear()
    field.send_keys(admin_key)


def learn_via_admin(drv: WebDriver, client: httpx.Client, category: str, added: int, suggested: str) -> None:
    """Preview (nothing changes), then apply: the references count grows by the false alarms judged good."""
    open_admin(drv, category, ADMIN_SECRET)
    wait_for(drv, lambda d: by_testid(d, "reference-count").text == "0", "no references yet", timeout=20)
    assert by_testid(drv, "learn-apply").get_attribute("disabled") is not None  # preview first
    by_testid(drv, "learn-preview").click()
    wait_for(drv, lambda d: "Preview for" in by_testid(d, "learn-plan").text, "the learn preview", timeout=60)
    plan = by_testid(drv, "learn-plan")
    assert by_testid(plan, "learn-references").text.startswith(f"0 → {added} ")
    assert [li.text for li in by_testid(plan, "learn-suggested").find_elements(By.TAG_NAME, "li")] == [suggested]
    assert "→" in by_testid(plan, "learn-threshold").text
    held = client.get(f"/v1/categories/{category}/references", headers=AUTH).json()["references"]
    assert held == 0 and by_testid(drv, "reference-count").text == "0"  # a dry run changes nothing
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'})", by_testid(drv, "learn-plan"))
    shot(drv, f"learn-preview-{category}")

    by_testid(drv, "learn-apply").click()
    wait_for(drv, lambda d: "Applied to" in by_testid(d, "learn-plan").text, "learn applied", timeout=120)
    wait_for(drv, lambda d: by_testid(d, "reference-count").text == str(added), "the references grew", timeout=20)
    assert client.get(f"/v1/categories/{category}/references", headers=AUTH).json()["references"] == added
    wait_for(drv, lambda d: by_testid(d, "threshold-source").text == "learned from reviews", "learned", timeout=20)
    wait_for(drv, lambda d: history(d) and "learned from reviews" in history(d)[0]["text"], "history: learned",
             timeout=20)
    assert "by boss" in history(drv)[0]["who"]
    assert by_testid(drv, "learn-apply").get_attribute("disabled") is not None  # applied once


def review_flow(drv: WebDriver, client: httpx.Client, url: str, category: str, goods: int) -> None:
    """`goods` false alarms judged good with `g`, one true defect with `d`; trends; learn."""
    open_console(drv, url, READER_KEY)
    before = wait_totals(drv, category, ng=str(goods + 1), false_alarms="0", reviewed="0")
    assert before["inspected"] == str(goods + 1)
    shot(drv, f"trends-before-{category}")

    ids = open_review(drv, category, goods + 1)
    expected = client.get(f"/v1/inspections?category={category}&verdict=ng&reviewed=false", headers=READ).json()
    assert ids == [i["id"] for i in expected["items"]]  # newest first, as the API lists them
    assert selected_id(drv) == ids[0]
    wait_for(drv, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                                by_testid(d, "review-image")), "the kept image", timeout=20)
    wait_for(drv, lambda d: by_testid(d, "review-heatmap-note").text, "the heatmap shown or explained", timeout=20)
    # no heatmap asked for: the record kept its own JPEG overlay, and says so (embedded, and through the stream)
    assert [i["heatmap_kind"] for i in expected["items"]] == ["overlay"] * len(ids)
    assert by_testid(drv, "review-heatmap-note").text == "server-blended overlay"
    assert by_testid(drv, "review-verdict").text == "NG"
    assert by_testid(drv, "review-threshold").text == "0.000"
    # the key that made the inspection: the camera's (a bare key, named by its hash), in the detail and the list
    key_name = expected["items"][0]["key_name"]
    assert key_name.startswith("key-") and by_testid(drv, "review-key").text == key_name
    assert f"key {key_name}" in all_by_testid(drv, "review-item")[0].text

    # a reader key may read, not judge: the 403 is explained next to the view, nothing leaves the queue
    by_testid(drv, "reviewer-key").clear()
    press(drv, "g")
    wait_for(drv, lambda d: by_testid(d, "review-error").is_displayed(), "the 403 explained", timeout=20)
    assert by_testid(drv, "review-error-title").text == "Not allowed to judge"
    assert "Reviewer key" in by_testid(drv, "review-error-message").text
    assert by_testid(drv, "review-error-code").text == "HTTP 403 · forbidden"
    assert queue_ids(drv) == ids
    shot(drv, f"review-403-{category}")

    by_testid(drv, "reviewer-key").send_keys(REVIEWER_KEY)
    judge_by_key(drv, "g")
    assert not by_testid(drv, "review-error").is_displayed()
    judged = client.get(f"/v1/inspections/{ids[0]}", headers=READ).json()["review"]
    assert (judged["label"], judged["reviewer"]) == ("good", "rita")

    # keys typed into a field are text, not judgements
    note = by_testid(drv, "review-note")
    note.click()
    note.send_keys("gd")
    assert note.get_attribute("value") == "gd" and len(queue_ids(drv)) == goods
    note.clear()
    note.send_keys(Keys.ESCAPE)
    # the arrow keys move between items
    press(drv, Keys.ARROW_DOWN)
    wait_for(drv, lambda d: selected_id(d) == ids[2], "the next item", timeout=10)
    press(drv, Keys.ARROW_UP)
    wait_for(drv, lambda d: selected_id(d) == ids[1], "the item before", timeout=10)

    for _ in range(goods - 1):
        judge_by_key(drv, "g")
    assert queue_ids(drv) == [ids[-1]]  # the defect, inspected first, is the oldest
    kind = by_testid(drv, "review-defect-type")
    options = drv.execute_script("return [...document.querySelectorAll('#review-types option')].map(o => o.value)")
    cat = client.get(f"/v1/categories/{category}", headers=AUTH).json()
    assert options == cat["descriptions"]  # the datalist offers the category's descriptions
    kind.send_keys("Burn mark")
    kind.send_keys(Keys.ESCAPE)
    judge_by_key(drv, "d")
    wait_for(drv, lambda d: all_by_testid(d, "review-empty"), "an empty queue", timeout=10)
    done = all_by_testid(drv, "review-done-item")
    assert len(done) == goods + 1 and by_testid(done[0], "review-done-type").text == "type: Burn mark"
    assert by_testid(done[0], "review-done-key").text == f"key: {key_name}"
    assert [by_testid(d, "review-done-label").text.lower() for d in done] == ["defect"] + ["good"] * goods
    shot(drv, f"review-done-{category}")

    after = wait_totals(drv, category, false_alarms=str(goods), confirmed_defects="1", reviewed=str(goods + 1))
    assert after["false_rate"] == f"{100 * goods / (goods + 1):.1f} %"
    judged = sorted(["defect"] + ["good"] * goods)
    wait_for(drv, lambda d: sorted(r["review"] for r in rows(d, "record-row")) == judged, "the records with their "
             "reviews", timeout=20)  # listed after the counts
    assert all_by_testid(drv, "chart-point")  # the rates are drawn
    assert {r["key_name"] for r in rows(drv, "record-row")} == {key_name}
    shot(drv, f"trends-after-{category}")

    learn_via_admin(drv, client, category, goods, "Burn mark")
    assert csp_violations(drv) == []


# --- tests ---------------------------------------------------------------------------------------------------


def test_review_with_keys_trends_and_learn(driver: WebDriver, server: ServerThread,  # noqa: F811
                                           tmp_path: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        make_ng(client, "fabric")
        goods = good_variants(tmp_path, "fabric_good.png")
        inspect_files(client, "fabric", [SAMPLES / "fabric_stain.png"], "line-a")
        inspect_files(client, "fabric", goods, "line-a")
        wait_records(client, "fabric", 4)
        review_flow(driver, client, server.url, "fabric", goods=3)


def test_a_camera_key_is_told_it_may_not_read_records(driver: WebDriver, server: ServerThread) -> None:  # noqa: F811
    """With a camera key in API key the console still lists the categories (the catalog is a camera's), and the
    Review and Trends views and the threshold history say that this key may not read records, in place of them."""
    open_console(driver, server.url)  # the camera key: the categories load
    tab(driver, "review")
    wait_for(driver, lambda d: all_by_testid(d, "review-denied"), "the queue's refusal", timeout=20)
    assert by_testid(driver, "review-error-title").text == "This key may not read records"
    assert "reader, reviewer or admin key in API key" in by_testid(driver, "review-error-message").text
    assert by_testid(driver, "review-error-code").text == "HTTP 403 · forbidden"
    assert not all_by_testid(driver, "review-item") and not by_testid(driver, "review-badge").is_displayed()
    shot(driver, "review-camera-key")
    tab(driver, "trends")
    wait_for(driver, lambda d: by_testid(d, "trends-error").is_displayed(), "the trends' refusal", timeout=20)
    assert by_testid(driver, "trends-error-title").text == "This key may not read records"
    assert "This key may not read inspection records." in by_testid(driver, "trends-table").text
    assert not all_by_testid(driver, "record-row") and not all_by_testid(driver, "trends-row")
    assert not all_by_testid(driver, "chart-point")
    shot(driver, "trends-camera-key")
    open_admin(driver, "metal", ADMIN_SECRET)
    wait_for(driver, lambda d: "history unavailable: A camera key inspects only" in
             by_testid(d, "threshold-history").text, "the history's refusal", timeout=20)
    # the same page with a reader key reads them
    field = by_testid(driver, "api-key")
    field.clear()
    field.send_keys(READER_KEY + Keys.ENTER)
    tab(driver, "review")
    wait_for(driver, lambda d: all_by_testid(d, "review-item") or all_by_testid(d, "review-empty"), "the queue",
             timeout=20)
    assert not by_testid(driver, "review-error").is_displayed() and not all_by_testid(driver, "review-denied")
    assert csp_violations(driver) == []


def test_trends_export_has_the_filters(driver: WebDriver, server: ServerThread, downloads: Path) -> None:  # noqa: F811
    with httpx.Client(base_url=server.url, timeout=120) as client:
        make_ng(client, "bolt")
        inspect_files(client, "bolt", [SAMPLES / "bolt_crack.png"], "line-b")
        inspect_files(client, "bolt", [SAMPLES / "bolt_good.png"], "line-c")
        wait_records(client, "bolt", 2)
    open_console(driver, server.url, READER_KEY)
    by_testid(driver, "tab-inspect").send_keys(Keys.ARROW_RIGHT)  # the tabs work from the keyboard
    wait_for(driver, lambda d: by_testid(d, "view-review").is_displayed(), "Review by the arrow key", timeout=10)
    assert driver.execute_script("return document.activeElement.id") == "tab-review"
    assert not by_testid(driver, "view-inspect").is_displayed()
    driver.switch_to.active_element.send_keys(Keys.END)
    wait_for(driver, lambda d: by_testid(d, "view-trends").is_displayed(), "Trends by End", timeout=10)
    assert driver.execute_script("return location.hash") == "#trends"
    Select(by_testid(driver, "trends-category")).select_by_value("bolt")
    source = by_testid(driver, "trends-source")
    source.send_keys("line-b")
    by_testid(driver, "trends-apply").click()
    wait_for(driver, lambda d: [r["source"] for r in rows(d, "record-row")] == ["line-b"], "the filtered records",
             timeout=20)
    before = set(downloads.glob("*.csv"))
    by_testid(driver, "trends-export").click()
    csv_rows = read_download(downloads, before)
    assert [(r["category"], r["source"]) for r in csv_rows] == [("bolt", "line-b")]
    # a source the API refuses: explained beside the view
    source.clear()
    source.send_keys("bad source!")
    by_testid(driver, "trends-apply").click()
    wait_for(driver, lambda d: by_testid(d, "trends-error").is_displayed(), "the 422 explained", timeout=20)
    assert "HTTP 422" in by_testid(driver, "trends-error-code").text
    assert "source" in by_testid(driver, "trends-error-message").text


def test_admin_threshold_by_hand_history_and_the_calibration_refusal(driver: WebDriver,  # noqa: F811
                                                                      server: ServerThread) -> None:
    open_console(driver, server.url, READER_KEY)
    open_admin(driver, "metal", ADMIN_SECRET)
    by_testid(driver, "calibrate").click()  # no references: refused, and the console says what it can do
    wait_for(driver, lambda d: by_testid(d, "admin-error").is_displayed(), "the refusal beside the buttons", timeout=20)
    assert by_testid(driver, "admin-error-title").text == "Not enough references to calibrate"
    message = by_testid(driver, "admin-error-message").text
    assert "Review" in message and "Learn from reviews" in message and "labelled" not in message
    assert driver.execute_script("return document.getElementById('admin-error').previousElementSibling.id") == \
        "reference-actions"
    assert by_testid(driver, "admin-error-learn").is_displayed()
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", by_testid(driver, "admin-error"))
    shot(driver, "admin-refusal")
    by_testid(driver, "admin-error-learn").click()
    wait_for(driver, lambda d: "Preview for metal" in by_testid(d, "learn-plan").text, "the learn preview", timeout=30)
    assert not by_testid(driver, "admin-error").is_displayed()

    by_testid(driver, "manual-threshold").send_keys("1.5")  # out of range: refused in the page, nothing sent
    by_testid(driver, "set-threshold").click()
    wait_for(driver, lambda d: by_testid(d, "admin-error").is_displayed(), "the number refused", timeout=10)
    assert by_testid(driver, "admin-error-title").text == "Check the numbers"
    assert "from 0 to 1" in by_testid(driver, "admin-error-message").text
    assert not by_testid(driver, "admin-error-learn").is_displayed()
    assert driver.execute_script("return document.getElementById('admin-error').previousElementSibling.id") == \
        "threshold-actions"
    by_testid(driver, "manual-threshold").clear()
    by_testid(driver, "manual-threshold").send_keys("0.42")
    by_testid(driver, "review-margin").send_keys("0.05")
    by_testid(driver, "set-threshold").click()
    wait_for(driver, lambda d: by_testid(d, "threshold-source").text == "set by hand", "the manual threshold", timeout=20)
    assert by_testid(driver, "threshold").text == "0.420"
    wait_for(driver, lambda d: by_testid(d, "review-margin-now").text == "0.050", "the review margin", timeout=20)
    wait_for(driver, lambda d: history(d) and "set by hand" in history(d)[0]["text"], "the history", timeout=20)
    first = history(driver)[0]
    assert first["values"].endswith("→ 0.420")
    assert "by boss" in first["who"] and "margin 0.050" in first["who"]

    field = by_testid(driver, "admin-key")  # a camera key may not write: said beside the threshold buttons
    field.clear()
    field.send_keys(API_KEY)
    by_testid(driver, "clear-manual-threshold").click()
    wait_for(driver, lambda d: by_testid(d, "admin-error").is_displayed(), "the 403 beside the buttons", timeout=20)
    assert by_testid(driver, "admin-error-title").text == "Not allowed"
    assert driver.execute_script("return document.getElementById('admin-error').previousElementSibling.id") == \
        "threshold-actions"
    field.clear()
    field.send_keys(ADMIN_SECRET)
    by_testid(driver, "clear-manual-threshold").click()
    wait_for(driver, lambda d: history(d) and "manual threshold removed" in history(d)[0]["text"],
             "the removal in the history", timeout=20)
    assert by_testid(driver, "threshold-source").text != "set by hand"
    assert csp_violations(driver) == []


def test_hostile_source_and_note_stay_text(driver: WebDriver, server: ServerThread,  # noqa: F811
                                           state_dir: Path) -> None:
    store = RecordStore(open_engine(f"sqlite:///{state_dir / 'records.db'}"))
    record = InspectionRecord("hostile-1", now_ms(), "hostile", 0.9, True, False, 0.5, "default", 0, None, [],
                              [{"description": HOSTILE, "similarity": 0.3}], "m", {}, HOSTILE_SOURCE)
    store.insert_many([record])
    store.engine.dispose()
    open_console(driver, server.url, READER_KEY)
    open_review(driver, "hostile", 1)
    by_testid(driver, "reviewer-key").clear()
    by_testid(driver, "reviewer-key").send_keys(REVIEWER_KEY)
    wait_for(driver, lambda d: (by_testid(d, "review-source").text == HOSTILE_SOURCE
                                and HOSTILE_SOURCE in all_by_testid(d, "review-item")[0].text
                                and HOSTILE in by_testid(d, "review-top-types").text
                                and "not kept" in by_testid(d, "review-heatmap-note").text),
             "the hostile source, type and the missing heatmap shown as text", timeout=20)
    by_testid(driver, "review-defect-type").send_keys(HOSTILE)
    by_testid(driver, "review-note").send_keys(HOSTILE)
    by_testid(driver, "review-defect").click()
    wait_for(driver, lambda d: all_by_testid(d, "review-done-item"), "the judgement listed", timeout=20)
    done = all_by_testid(driver, "review-done-item")[0]
    assert by_testid(done, "review-done-note").text == f"note: {HOSTILE}"
    assert by_testid(done, "review-done-source").text == f"source: {HOSTILE_SOURCE}"

    tab(driver, "trends")
    Select(by_testid(driver, "trends-category")).select_by_value("hostile")
    # read in the same look that finds it (showing the tab and choosing the category each redraw the list)
    cells = wait_for(driver, lambda d: next((r for r in rows(d, "record-row") if r["_id"] == "hostile-1"), None),
                     "the hostile record listed", timeout=20)
    assert (cells["source"], cells["note"], cells["defect_type"]) == (HOSTILE_SOURCE, HOSTILE, HOSTILE)
    shot(driver, "hostile-review-trends")
    assert driver.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    assert_no_alert(driver)
    assert csp_violations(driver) == []


# The shown heatmap's pixels at the given (x, y) points, drawn on a canvas at its own size (CSS opacity aside),
# with where it came from: "data:" coloured by the page, "blob:" the kept bytes as they are.
HEATMAP_PIXELS_JS = """const img = arguments[0];
if (img.hidden || !img.complete || !img.naturalWidth) return null;
const c = document.createElement("canvas");
c.width = img.naturalWidth;
c.height = img.naturalHeight;
const ctx = c.getContext("2d");
ctx.drawImage(img, 0, 0);
const d = ctx.getImageData(0, 0, c.width, c.height).data;
return {src: img.src.split(":")[0], width: c.width, height: c.height,
        px: arguments[1].map(([x, y]) => [0, 1, 2].map(k => d[4 * (y * c.width + x) + k]))};"""


def grey_png(level: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), level, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def shown_heatmap(drv: WebDriver, record_id: str, points: list[tuple[int, int]]) -> tuple[dict, str]:
    """Selects `record_id` in the queue; its heatmap as drawn (see HEATMAP_PIXELS_JS) and the note under it."""
    drv.find_element(By.CSS_SELECTOR, f'[data-testid="review-item"][data-id="{record_id}"]').click()
    wait_for(drv, lambda d: by_testid(d, "review-id").text == record_id, f"{record_id} selected", timeout=10)
    box: dict = {}

    def drawn(d: WebDriver) -> bool:
        box["img"] = d.execute_script(HEATMAP_PIXELS_JS, by_testid(d, "review-heatmap"), points)
        box["note"] = by_testid(d, "review-heatmap-note").text
        return bool(box["img"] and box["note"])

    wait_for(drv, drawn, f"the heatmap of {record_id} shown", timeout=20)
    return box["img"], box["note"]


def test_review_shows_the_heatmap_by_its_recorded_kind(driver: WebDriver, server: ServerThread,  # noqa: F811
                                                       state_dir: Path) -> None:
    # real inspections kept with heatmap=map (the raw grey map) and heatmap=jpeg (an overlay)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        make_ng(client, KINDS)
        kept = {}
        for asked in ("map", "jpeg"):
            r = client.post("/v1/inspect", headers=AUTH, data={"category": KINDS, "heatmap": asked},
                            files={"image": ("metal.png", (SAMPLES / "metal_good.png").read_bytes(), "image/png")})
            assert r.status_code == 200, r.text
            kept[asked] = r.json()["request_id"]
        wait_records(client, KINDS, 2)
        assert [client.get(f"/v1/inspections/{kept[a]}", headers=READ).json()["heatmap_kind"] for a in kept] == \
            ["map", "overlay"]
        raw = client.get(f"/v1/inspections/{kept['map']}/heatmap", headers=READ)
        grey = np.asarray(Image.open(io.BytesIO(raw.content)))
        assert grey.ndim == 2
    # written behind the API's back: an overlay that happens to be grey (the kind, not the pixels, decides),
    # and a grey map kept before records said their kind (only then does the page tell by the pixels)
    image = [Artefact("image", "image/png", grey_png(90, 64))]
    grey_overlay = replace(record_at("kind-grey-overlay", now_ms() - 60_000, KINDS, True, "line-k"),
                           artefacts=[*image, Artefact("heatmap", "image/png", grey_png(128))], heatmap_kind="overlay")
    old_map = replace(record_at("kind-old-map", now_ms() - 120_000, KINDS, True, "line-k"),
                      artefacts=[*image, Artefact("heatmap", "image/png", grey_png(200))])
    write_records(state_dir, [grey_overlay, old_map])
    jet = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(1, 256), cv2.COLORMAP_JET)[0][:, ::-1].astype(int)

    open_console(driver, server.url, READER_KEY)
    open_review(driver, KINDS, 4)

    h, w = grey.shape
    points = [(x, y) for y in range(0, h, max(1, h // 8)) for x in range(0, w, max(1, w // 8))]
    img, note = shown_heatmap(driver, kept["map"], points)
    assert (img["src"], img["width"], img["height"]) == ("data", w, h)  # coloured by the page, at the map's size
    assert note == "jet colour map: blue low, red high"
    coloured = np.array(img["px"])
    assert int(np.abs(coloured - jet[[grey[y, x] for x, y in points]]).max()) <= 2  # JET of the kept map
    assert len({tuple(p) for p in coloured}) > 1  # a map with something on it, not one flat colour
    shot(driver, "review-heatmap-map")

    img, note = shown_heatmap(driver, kept["jpeg"], [(0, 0)])
    assert img["src"] == "blob" and note == "server-blended overlay"  # the kept JPEG as it is

    img, note = shown_heatmap(driver, "kind-grey-overlay", [(0, 0), (16, 16), (31, 31)])
    assert img["src"] == "blob" and note == "server-blended overlay"
    assert img["px"] == [[128, 128, 128]] * 3  # grey, yet shown as kept: the recorded kind decides

    img, note = shown_heatmap(driver, "kind-old-map", [(0, 0), (31, 31)])  # heatmap_kind null: the grey test
    assert img["src"] == "data" and note == "jet colour map: blue low, red high"
    assert all(abs(a - b) <= 2 for px in img["px"] for a, b in zip(px, jet[200]))
    assert csp_violations(driver) == []


# --- records written at chosen past times: buckets, since/until, paging -----------------------------------------

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
KOLKATA = timedelta(hours=5, minutes=30)  # a half-hour zone: a whole-hour mistake shows

CHARTS_JS = """return [...document.querySelectorAll(`#${arguments[0]} [data-testid="chart-series"]`)].map(g => {
  const line = g.querySelector("polyline");
  return {category: g.querySelector(":scope > title").textContent,
          line: line ? line.getAttribute("points") : null, stroke: line ? getComputedStyle(line).stroke : null,
          points: [...g.querySelectorAll('[data-testid="chart-point"]')].map(c => ({
            x: c.getAttribute("cx"), y: c.getAttribute("cy"), tip: c.querySelector("title").textContent}))};
})"""


DAY0 = (now_ms() // DAY_MS - 3) * DAY_MS  # UTC midnight three days ago, once (a run may cross midnight)


def at(day: int, clock: str) -> int:
    """`clock` ("HH:MM" or "HH:MM:SS.mmm", UTC) on DAY0 + `day` (at most day 2: in the past), in epoch ms."""
    moment = datetime.strptime(clock, "%H:%M:%S.%f" if "." in clock else "%H:%M")
    return DAY0 + day * DAY_MS + (moment - datetime(1900, 1, 1)) // timedelta(milliseconds=1)


def write_records(state_dir: Path, records: list[InspectionRecord], reviews: dict[str, str] | None = None) -> None:
    """Records straight into the server's SQLite file (the API cannot backdate), judged where `reviews` says."""
    store = RecordStore(open_engine(f"sqlite:///{state_dir / 'records.db'}"))
    try:
        assert store.insert_many(records) == len(records)
        for record_id, label in (reviews or {}).items():
            judged = Review(label, None, None, "rita", now_ms())  # type: ignore[arg-type]
            assert store.review(record_id, judged) is not None
    finally:
        store.engine.dispose()


def record_at(record_id: str, created_ms: int, category: str, ng: bool, source: str,
              needs_review: bool = False) -> InspectionRecord:
    return InspectionRecord(record_id, created_ms, category, 0.9 if ng else 0.1, ng, needs_review, 0.5, "default", 0,
                            None, [], [], "m", {}, source)


def newest_first(records: list[InspectionRecord]) -> list[str]:
    return [r.id for r in sorted(records, key=lambda r: (r.created_ms, r.id), reverse=True)]


def utc_text(ms: int) -> str:
    """How the page writes a UTC time: "2026-12-04 10:15:02"."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "–"


def count_cells(c: dict[str, int]) -> dict[str, str]:
    judged = c["false_alarms"] + c["confirmed_defects"]
    return {"inspected": str(c["inspected"]), "ng": str(c["ng"]), "ng_rate": pct(c["ng"], c["inspected"]),
            "reviewed": str(c["reviewed"]), "confirmed_defects": str(c["confirmed_defects"]),
            "false_alarms": str(c["false_alarms"]), "false_rate": pct(c["false_alarms"], judged),
            "misses": str(c["misses"])}


def bucket_counts(records: list[InspectionRecord], labels: dict[str, str], size: int
                  ) -> dict[tuple[int, str], dict[str, int]]:
    """What GET /v1/stats should count, worked out here from what was written: (bucket start, category) -> counts."""
    out: dict[tuple[int, str], dict[str, int]] = {}
    for r in records:
        c = out.setdefault((r.created_ms // size * size, r.category), dict.fromkeys(
            ("inspected", "ng", "reviewed", "confirmed_defects", "false_alarms", "misses"), 0))
        label = labels.get(r.id)
        c["inspected"] += 1
        c["ng"] += r.is_anomalous
        c["reviewed"] += label is not None
        c["confirmed_defects"] += r.is_anomalous and label == "defect"
        c["false_alarms"] += r.is_anomalous and label == "good"
        c["misses"] += (not r.is_anomalous) and label == "defect"
    return out


def totals_of(counts: dict[tuple[int, str], dict[str, int]]) -> dict[str, dict[str, int]]:
    """The counts summed over the buckets, per category (the page's "all shown" rows)."""
    out: dict[str, dict[str, int]] = {}
    for (_, category), n in sorted(counts.items(), key=lambda kv: kv[0][1]):
        total = out.setdefault(category, dict.fromkeys(n, 0))
        for k, v in n.items():
            total[k] += v
    return out


def table(drv: WebDriver, testid: str) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows(drv, testid)]


def wait_equal(drv: WebDriver, read, expected, what: str, timeout: float = 30):
    """Waits until `read(drv)` equals `expected`; says what was seen when it never does."""
    box: dict[str, object] = {}

    def same(d: WebDriver) -> bool:
        box["seen"] = read(d)
        return box["seen"] == expected

    try:
        wait_for(drv, same, what, timeout=timeout)
    except Exception as exc:
        raise AssertionError(f"{what}:\n seen     {box.get('seen')!r}\n expected {expected!r}") from exc


def show_trends(drv: WebDriver, source: str, bucket: str) -> None:
    tab(drv, "trends")
    Select(by_testid(drv, "trends-bucket")).select_by_value(bucket)
    field = by_testid(drv, "trends-source")
    field.clear()
    field.send_keys(source)
    by_testid(drv, "trends-apply").click()


def type_local(drv: WebDriver, testid: str, moment: datetime) -> None:
    """Types a local date and time into a datetime-local field the way a person does (en-US: mm/dd/yyyy, hh:mm AM)."""
    field = by_testid(drv, testid)
    field.send_keys(moment.strftime("%m%d%Y") + Keys.TAB + moment.strftime("%I%M%p"))
    assert field.get_attribute("value") == moment.strftime("%Y-%m-%dT%H:%M")


def check_buckets(drv: WebDriver, records: list[InspectionRecord], labels: dict[str, str], bucket: str) -> None:
    """The counts table (rows and totals), the summary and both charts against what was written."""
    counts = bucket_counts(records, labels, {"hour": HOUR_MS, "day": DAY_MS}[bucket])
    assert len({b for b, _ in counts}) >= 3  # several buckets, or this checks little
    expected_rows = [{"bucket": utc_text(b), "category": c, **count_cells(n)}
                     for (b, c), n in sorted(counts.items(), key=lambda kv: (-kv[0][0], kv[0][1]))]
    wait_equal(drv, lambda d: table(d, "trends-row"), expected_rows, f"the counts per {bucket}")
    totals = totals_of(counts)
    categories = list(totals)
    assert table(drv, "trends-total") == [{"bucket": "all shown", "category": c, **count_cells(totals[c])}
                                          for c in categories]
    inspected = sum(t["inspected"] for t in totals.values())
    ng = sum(t["ng"] for t in totals.values())
    assert by_testid(drv, "trends-summary").text == (
        f"{inspected} inspected, {ng} NG ({pct(ng, inspected)}), {sum(t['reviewed'] for t in totals.values())} "
        f"reviewed, {sum(t['false_alarms'] for t in totals.values())} false alarms · per {bucket}, times in UTC")

    def series(rate, explain) -> list[dict]:
        out = []
        for c in categories:
            points = [(b, n) for (b, cat), n in sorted(counts.items()) if cat == c and rate(n) is not None]
            if points:
                out.append({"category": c, "tips": [f"{c} · {utc_text(b)} UTC · {100 * rate(n):.1f} % ({explain(n)})"
                                                    for b, n in points]})
        return out

    def judged(n: dict[str, int]) -> int:
        return n["false_alarms"] + n["confirmed_defects"]

    charts = {
        "chart-ng": series(lambda n: n["ng"] / n["inspected"], lambda n: f"{n['ng']} of {n['inspected']} NG"),
        "chart-false": series(lambda n: n["false_alarms"] / judged(n) if judged(n) else None,
                              lambda n: f"{n['false_alarms']} of {judged(n)} reviewed NG judged good"),
    }
    for chart, want in charts.items():
        drawn = drv.execute_script(CHARTS_JS, chart)
        assert [{"category": s["category"], "tips": [p["tip"] for p in s["points"]]} for s in drawn] == want, chart
        for s in drawn:  # one point per bucket, joined by a visible line in time order
            assert len(s["points"]) >= 2, (chart, s)
            assert s["line"] == " ".join(f"{p['x']},{p['y']}" for p in s["points"]), (chart, s)
            xs = [float(p["x"]) for p in s["points"]]
            assert xs == sorted(xs) and len(set(xs)) == len(xs), (chart, s)
            assert s["stroke"] not in (None, "none", ""), (chart, s)


def test_trends_counts_and_charts_per_hour_and_per_day(driver: WebDriver, server: ServerThread,  # noqa: F811
                                                        state_dir: Path) -> None:
    # (category, day, clock, NG, judgement): several hours of three days, two categories
    plan = [("cable", 0, "09:10", True, "good"), ("cable", 0, "09:25", True, "defect"),
            ("cable", 0, "09:50", False, None), ("cable", 0, "10:20", True, "good"),
            ("cable", 0, "10:40", True, "good"), ("cable", 0, "13:05", True, None), ("cable", 0, "13:10", False, None),
            ("cable", 0, "13:15", False, "defect"),  # a miss
            ("cable", 0, "13:20", False, None), ("cable", 1, "08:00", True, "defect"),
            ("cable", 1, "08:30", False, None),
            ("tile", 0, "09:40", True, "good"), ("tile", 0, "09:45", True, None), ("tile", 0, "13:30", False, None),
            ("tile", 1, "08:15", True, "defect"), ("tile", 1, "08:20", True, "defect"),
            ("tile", 1, "08:25", True, "good"), ("tile", 2, "15:00", True, "good"), ("tile", 2, "15:05", False, None)]
    records = [record_at(f"tb-{i:02d}", at(day, clock), category, ng, "trend-buckets")
               for i, (category, day, clock, ng, _) in enumerate(plan)]
    labels = {f"tb-{i:02d}": label for i, (*_, label) in enumerate(plan) if label}
    write_records(state_dir, records, labels)

    open_console(driver, server.url, READER_KEY)
    show_trends(driver, "trend-buckets", "hour")
    check_buckets(driver, records, labels, "hour")
    totals = {r["category"]: r for r in table(driver, "trends-total")}
    assert (totals["cable"]["false_rate"], totals["tile"]["false_rate"]) == ("60.0 %", "60.0 %")  # 3 of 5 each
    wait_equal(driver, lambda d: [r["_id"] for r in rows(d, "record-row")], newest_first(records), "the records")
    shot(driver, "trends-per-hour")
    Select(by_testid(driver, "trends-bucket")).select_by_value("day")  # redraws by itself
    check_buckets(driver, records, labels, "day")
    shot(driver, "trends-per-day")
    assert csp_violations(driver) == []


@pytest.fixture
def kolkata(driver: WebDriver) -> Iterator[None]:  # noqa: F811
    """The browser's local time is Asia/Kolkata (UTC+05:30) for one test (a DevTools override of this tab)."""
    driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": "Asia/Kolkata"})
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": ""})


def test_trends_since_until_are_local_times_sent_as_utc(driver: WebDriver, server: ServerThread,  # noqa: F811
                                                        state_dir: Path, downloads: Path,  # noqa: F811
                                                        kolkata: None) -> None:
    # the window is [06:00, 10:00) UTC on day 1: 11:30 to 15:30 in Kolkata; around it, what a mistake would let in
    plan = [("05:29", False), ("05:45", True), ("06:00:00.000", True), ("07:30", False), ("07:45", True),
            ("09:59:59.999", True), ("10:00:00.000", False), ("11:00", True)]
    records = [record_at(f"tw-{i}", at(1, clock), "cable", ng, "trend-window") for i, (clock, ng) in enumerate(plan)]
    labels = {"tw-4": "good", "tw-1": "defect"}
    write_records(state_dir, records, labels)
    since, until = at(1, "06:00"), at(1, "10:00")
    inside = [r for r in records if since <= r.created_ms < until]
    assert [r.id for r in inside] == ["tw-2", "tw-3", "tw-4", "tw-5"]

    open_console(driver, server.url, READER_KEY)
    assert driver.execute_script("return new Date(arguments[0]).getTimezoneOffset()", since) == -330  # UTC+05:30
    show_trends(driver, "trend-window", "hour")
    wait_equal(driver, lambda d: [r["_id"] for r in rows(d, "record-row")], newest_first(records), "all the records")

    def local(ms: int) -> datetime:
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).replace(tzinfo=None) + KOLKATA

    type_local(driver, "trends-since", local(since))
    type_local(driver, "trends-until", local(until))
    driver.get_log("performance")  # forget the calls so far
    by_testid(driver, "trends-apply").click()
    wait_equal(driver, lambda d: [r["_id"] for r in rows(d, "record-row")], newest_first(inside),
               "the records inside the window")
    assert [r["time"] for r in rows(driver, "record-row")] == [utc_text(r.created_ms) for r in reversed(inside)]
    counts = bucket_counts(inside, labels, HOUR_MS)
    wait_equal(driver, lambda d: table(d, "trends-row"),
               [{"bucket": utc_text(b), "category": c, **count_cells(n)} for (b, c), n in sorted(counts.items(),
                                                                                                 reverse=True)],
               "the counts inside the window")
    assert table(driver, "trends-total") == [{"bucket": "all shown", "category": "cable",
                                              **count_cells(totals_of(counts)["cable"])}]
    assert table(driver, "trends-total")[0]["inspected"] == "4"

    before = set(downloads.glob("*.csv"))
    by_testid(driver, "trends-export").click()
    assert [r["id"] for r in read_download(downloads, before)] == newest_first(inside)

    window = {"since": [f"{utc_text(since).replace(' ', 'T')}.000Z"],
              "until": [f"{utc_text(until).replace(' ', 'T')}.000Z"]}
    sent = {urlsplit(u).path.rsplit("/v1/", 1)[1]: parse_qs(urlsplit(u).query)
            for u, _ in api_requests(driver, server.url)}
    for path in ("stats", "inspections", "inspections/export"):  # the list, the counts and the CSV: the same UTC window
        assert {k: sent[path].get(k) for k in window} == window, (path, sent.get(path))
    shot(driver, "trends-since-until-kolkata")
    assert csp_violations(driver) == []


def test_trends_export_is_the_list_shown_not_the_fields(driver: WebDriver, server: ServerThread,  # noqa: F811
                                                       state_dir: Path, downloads: Path) -> None:  # noqa: F811
    shown = [record_at(f"tx-{i}", now_ms() - (i + 1) * 60_000, "cable", i % 2 == 0, "csv-shown") for i in range(3)]
    other = [record_at("tx-other", now_ms() - 30_000, "cable", True, "csv-other")]
    write_records(state_dir, shown + other)

    def listed(d: WebDriver) -> list[str]:
        return [r["_id"] for r in rows(d, "record-row")]

    def export() -> tuple[list[str], list[dict]]:
        """The ids in the CSV the page saves, and the queries of the export calls it made."""
        driver.get_log("performance")  # forget the calls so far
        before = set(downloads.glob("*.csv"))
        by_testid(driver, "trends-export").click()
        ids = [r["id"] for r in read_download(downloads, before)]
        sent = [parse_qs(urlsplit(u).query) for u, _ in api_requests(driver, server.url)
                if urlsplit(u).path.endswith("/v1/inspections/export")]
        return ids, sent

    open_console(driver, server.url, READER_KEY)
    show_trends(driver, "csv-shown", "day")
    wait_equal(driver, listed, newest_first(shown), "the list shown")
    field = by_testid(driver, "trends-source")
    field.clear()
    field.send_keys("csv-other")  # typed, not applied with Show
    assert export() == (newest_first(shown), [{"source": ["csv-shown"]}])  # the CSV is the list on the page
    assert listed(driver) == newest_first(shown)

    by_testid(driver, "trends-apply").click()  # now it is applied: the list and the CSV follow it
    wait_equal(driver, listed, ["tx-other"], "the list of the applied filter")
    assert export() == (["tx-other"], [{"source": ["csv-other"]}])

    field.clear()
    field.send_keys("bad source!")  # a Show the server refuses leaves the list as it was, and the CSV with it
    by_testid(driver, "trends-apply").click()
    wait_for(driver, lambda d: by_testid(d, "trends-error").is_displayed(), "the 422 explained", timeout=20)
    assert listed(driver) == ["tx-other"]
    assert export() == (["tx-other"], [{"source": ["csv-other"]}])
    assert csp_violations(driver) == []


def test_trends_records_load_more(driver: WebDriver, server: ServerThread, state_dir: Path) -> None:  # noqa: F811
    # 57 records (the page shows 50 at a time); ten share one time around the page's end (ties broken by id)
    records = [record_at(f"tm-{i:02d}", at(1, "12:00") - (45 if 45 <= i < 55 else i) * 60_000, "tile", i % 3 == 0,
                         "trend-more") for i in range(57)]
    expected = newest_first(records)
    open_console(driver, server.url, READER_KEY)
    write_records(state_dir, records)
    show_trends(driver, "trend-more", "day")
    wait_equal(driver, lambda d: [r["_id"] for r in rows(d, "record-row")], expected[:50], "the first 50 records")
    more = by_testid(driver, "records-more")
    assert more.is_displayed()
    more.click()
    wait_equal(driver, lambda d: [r["_id"] for r in rows(d, "record-row")], expected, "all 57 records, once each")
    wait_for(driver, lambda d: not by_testid(d, "records-more").is_displayed(), "no more to load", timeout=10)
    assert table(driver, "trends-total")[0]["inspected"] == "57"

    # the filters change while "Load more" is offered (a slow server): more of the old list must not mix in
    by_testid(driver, "trends-apply").click()
    wait_equal(driver, lambda d: [r["_id"] for r in rows(d, "record-row")], expected[:50], "the first 50 again")
    wait_for(driver, lambda d: by_testid(d, "records-more").is_displayed(), "Load more offered", timeout=10)
    ng = newest_first([r for r in records if r.is_anomalous])
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": False, "latency": 700,
                                                                "downloadThroughput": -1, "uploadThroughput": -1})
    try:
        Select(by_testid(driver, "trends-verdict")).select_by_value("ng")  # reloads by itself
        if by_testid(driver, "records-more").is_displayed():
            by_testid(driver, "records-more").click()
        wait_equal(driver, lambda d: [r["_id"] for r in rows(d, "record-row")], ng, "only the NG records, once each",
                   timeout=20)
        time.sleep(2)  # what a stray answer would add arrives by now
        assert [r["_id"] for r in rows(driver, "record-row")] == ng
    finally:
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                                    "downloadThroughput": -1, "uploadThroughput": -1})


def test_review_queue_load_more(driver: WebDriver, server: ServerThread, state_dir: Path) -> None:  # noqa: F811
    # 27 unreviewed NG and 4 borderline OK (the queue's two streams, 20 a page), interleaved in time; five NG and
    # one OK share a time where the NG stream's first page ends (ties broken by id); judged and plain OK never show
    start = now_ms() - 2 * HOUR_MS
    records = [record_at(f"rq-{i:02d}", start + (7 if 5 <= i < 10 else i) * 60_000, PAGED, True, "line-q")
               for i in range(27)]
    records += [record_at(f"rq-b{i}", start + t * 60_000, PAGED, False, "line-q", needs_review=True)
                for i, t in enumerate((2, 7, 17, 24))]
    judged = [record_at(f"rq-j{i}", start + t * 60_000, PAGED, True, "line-q") for i, t in enumerate((5, 30))]
    plain = [record_at(f"rq-ok{i}", start + t * 60_000, PAGED, False, "line-q") for i, t in enumerate((6, 31))]
    write_records(state_dir, records + judged + plain, {r.id: "good" for r in judged})
    expected = newest_first(records)

    open_console(driver, server.url, READER_KEY)
    tab(driver, "review")
    Select(by_testid(driver, "review-category")).select_by_value(PAGED)
    wait_equal(driver, queue_ids, expected[:20], "the first page of the queue")
    assert by_testid(driver, "review-summary").text == f"20+ waiting in {PAGED}"
    wait_for(driver, lambda d: by_testid(d, "review-id").text == expected[0], "the newest selected", timeout=10)
    more = by_testid(driver, "review-more")
    assert more.is_displayed()
    more.click()
    wait_equal(driver, queue_ids, expected, "the whole queue, newest first, once each")
    wait_for(driver, lambda d: not by_testid(d, "review-more").is_displayed(), "no more to load", timeout=10)
    assert by_testid(driver, "review-summary").text == f"31 waiting in {PAGED}"
    assert selected_id(driver) == expected[0]
    assert csp_violations(driver) == []


# --- queue mode: Redis, a worker, PostgreSQL ------------------------------------------------------------------


@pytest.mark.redis
def test_queue_mode_review_trends_and_learn(driver: WebDriver, redis_server: RedisServer,  # noqa: F811
                                            worker_pool: WorkerPool, postgres: PostgresServer,  # noqa: F811
                                            tmp_path: Path) -> None:
    redis_server.client().flushall()
    with queue_server(redis_server.url, worker_pool, records_url=postgres.url, records_keep="all",
                      reviewer_keys=[f"rita:{REVIEWER_KEY}"], reader_keys=[f"dana:{READER_KEY}"],
                      admin_key=f"boss:{ADMIN_SECRET}") as api, \
            httpx.Client(base_url=api.url, timeout=120) as client:
        wait_until(lambda: client.get("/v1/inspections", headers=READ).status_code == 200, 30, what="records ready")
        make_ng(client, "washer")
        inspect_files(client, "washer", [SAMPLES / "washer_missing.png"], "line-q")
        inspect_files(client, "washer", good_variants(tmp_path, "washer_good.png")[:2], "line-q")
        wait_records(client, "washer", 3)  # they arrive through the Redis stream
        review_flow(driver, client, api.url, "washer", goods=2)
