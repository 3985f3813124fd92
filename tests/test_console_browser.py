"""The QA console in a real headless Chromium, against real servers (embedded and queue mode).

Debian's `chromium` and `chromium-driver` (installed by scripts/test.sh when missing) are driven by
Selenium with the driver path given explicitly, so Selenium Manager never runs and nothing is
downloaded. Every wait is bounded. Screenshots land in out/console/.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.common.selenium_manager import SeleniumManager
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from service.api.app import create_app
from service.backends.embedded import EmbeddedBackend
from service.backends.redis_queue import RedisBackend
from service.engine.lifecycle import default_engine_factory
from service.settings import FiloSettings
from tests.conftest import needs
from tests.service_fixtures import (  # noqa: F401
    REPO,
    RedisServer,
    ServerThread,
    WorkerPool,
    demo_settings,
    redis_server,
    wait_ready,
    worker_pool,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _browser_installed() -> None:
    needs(CHROMIUM.exists() and CHROMEDRIVER.exists(),
          f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
          "scripts/test.sh installs them with apt-get")

API_KEY, ADMIN_KEY = "console-key", "console-admin"
HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_NOUN = "<b>bold</b> widget"
SAMPLES = REPO / "samples"
SHOTS = REPO / "out" / "console"
WAIT_S = 90


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def downloads() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="filo-console-dl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def driver(downloads: Path) -> Iterator[WebDriver]:
    profile = tempfile.mkdtemp(prefix="filo-console-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    never = mock.patch.object(SeleniumManager, "binary_paths", side_effect=AssertionError("no Selenium Manager"))
    with never:  # the driver path is explicit: nothing may look for, or download, a browser or driver
        drv = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        drv.set_window_size(1440, 1000)
        drv.set_page_load_timeout(30)
        drv.set_script_timeout(30)
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def hostile_descriptions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("console-desc") / "hostile.json"
    path.write_text(json.dumps({
        "format": "filo-descriptions/v1", "dataset": "hostile",
        "categories": [{"name": "hostile", "noun": HOSTILE_NOUN, "descriptions": [HOSTILE, "plain scratch"]}],
    }))
    return path


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, hostile_descriptions: Path) -> Iterator[ServerThread]:
    settings = demo_settings(
        state_dir=tmp_path_factory.mktemp("console-state"), api_keys=[API_KEY], admin_key=ADMIN_KEY,
        descriptions=[SAMPLES / "descriptions.json", hostile_descriptions], grounding=True,
    )
    with ServerThread(create_app(settings, EmbeddedBackend(settings))) as srv:
        wait_ready(srv.url)
        yield srv


# --- helpers -------------------------------------------------------------------------------------------------


def by_testid(root: WebDriver | WebElement, testid: str) -> WebElement:
    return root.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def all_by_testid(root: WebDriver | WebElement, testid: str) -> list[WebElement]:
    return root.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def wait_for(driver: WebDriver, condition, what: str, timeout: float = WAIT_S):
    """Polls `condition`; an element the page replaced meanwhile (it redraws lists as they load) is read again."""
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                         ).until(condition, message=what)


def shot(driver: WebDriver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def assert_no_alert(driver: WebDriver) -> None:
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018


def csp_violations(driver: WebDriver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser")
            if "Content Security Policy" in e["message"] or "Trusted Type" in e["message"]]


def api_requests(driver: WebDriver, base: str) -> list[tuple[str, dict[str, str]]]:
    """(url, headers) of every API call the page made since the last look (Chromium's network log)."""
    calls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] != "Network.requestWillBeSent":
            continue
        request = message["params"]["request"]
        if request["url"].startswith((f"{base}/v1/", f"{base}/readyz")):
            calls.append((request["url"], request["headers"]))
    return calls


def api_inspect(url: str, sample: str, category: str, grounding: bool, top_k: int) -> dict:
    """The same inspection straight from the API, to compare with what the page shows."""
    r = httpx.post(f"{url}/v1/inspect", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                   data={"category": category, "grounding": str(grounding).lower(), "top_k": str(top_k),
                         "heatmap": "none"},
                   files={"image": (sample, (SAMPLES / sample).read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def open_console(driver: WebDriver, url: str, key: str = API_KEY) -> None:
    """Opens `/` (which leads to the console) with no key, then connects with `key`."""
    driver.get(url + "/console/static/favicon.svg")  # same origin, no script of ours running
    driver.execute_script("sessionStorage.clear()")  # forget the key an earlier test typed in
    driver.get_log("performance")
    driver.get(url + "/")
    assert driver.current_url == url + "/console"
    wait_for(driver, lambda d: "API key" in by_testid(d, "connection").text, "the page asking for a key")
    assert all("Authorization" not in h for _, h in api_requests(driver, url))  # no key typed in yet
    field = by_testid(driver, "api-key")
    field.clear()
    field.send_keys(key + Keys.ENTER)
    wait_for(driver, lambda d: len(Select(by_testid(d, "category")).options) > 0, "categories loaded")


def choose(driver: WebDriver, category: str, samples: list[Path], grounding: bool = False, top_k: int = 3) -> None:
    Select(by_testid(driver, "category")).select_by_value(category)
    box = by_testid(driver, "grounding")
    if box.is_selected() != grounding:
        box.click()
    top = by_testid(driver, "top-k")
    top.clear()
    top.send_keys(str(top_k))
    by_testid(driver, "files").send_keys("\n".join(str(p) for p in samples))


def inspect(driver: WebDriver, n: int) -> list[WebElement]:
    """Presses Inspect and waits for `n` cards (results or failures) and the end of the batch."""
    by_testid(driver, "inspect").click()
    wait_for(driver, lambda d: len(all_by_testid(d, "result")) + len(all_by_testid(d, "result-failed")) == n
             and "inspected" in by_testid(d, "progress").text, f"{n} inspection results")
    return all_by_testid(driver, "result")


def overlay_width(driver: WebDriver, card: WebElement) -> int:
    overlay = by_testid(card, "overlay")
    wait_for(driver, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay),
             "the heatmap overlay to load", timeout=20)
    return int(driver.execute_script("return arguments[0].naturalWidth", overlay))


def opacity(driver: WebDriver, card: WebElement) -> float:
    return float(driver.execute_script("return getComputedStyle(arguments[0]).opacity", by_testid(card, "overlay")))


def check_result(driver: WebDriver, card: WebElement, expected: dict, top_k: int) -> None:
    """One card against the API's own answer for the same image: verdict, score, types, boxes, heatmap."""
    assert by_testid(card, "verdict").text == ("NG" if expected["is_anomalous"] else "OK")
    assert by_testid(card, "score").text == f"{expected['score']:.3f}"
    assert by_testid(card, "result-threshold").text == f"{expected['threshold']:.3f}"
    types = [li.find_element(By.CLASS_NAME, "type-name").text
             for li in by_testid(card, "top-types").find_elements(By.TAG_NAME, "li")]
    assert types == [t["description"] for t in expected["top_types"]] and len(types) == top_k
    texts = [f"{b['phrase']} {b['confidence']:.2f}" for b in expected["boxes"]]
    valid = [t for t, b in zip(texts, expected["boxes"]) if b["valid"]]
    assert len(all_by_testid(card, "box")) == len(expected["boxes"])  # drawn, in original pixels
    titles = card.find_elements(By.CSS_SELECTOR, '[data-testid="box"] > title')
    assert [t.get_attribute("textContent").split(" (not an anomaly")[0] for t in titles] == texts
    assert [el.get_attribute("textContent") for el in all_by_testid(card, "box-label")] == [
        t if len(t) <= 28 else t[:27] + "…" for t in valid]
    listed = [el.get_attribute("textContent") for el in all_by_testid(card, "box-item")]
    assert listed == valid + [t for t, b in zip(texts, expected["boxes"]) if not b["valid"]]
    assert overlay_width(driver, card) > 0
    assert "ms" in by_testid(card, "timings").text


def check_opacity_slider(driver: WebDriver, card: WebElement) -> None:
    assert opacity(driver, card) == pytest.approx(0.5)
    slider = by_testid(card, "opacity")
    slider.send_keys(Keys.HOME)
    wait_for(driver, lambda d: opacity(d, card) == 0.0, "overlay transparent", timeout=5)
    slider.send_keys(Keys.END)
    wait_for(driver, lambda d: opacity(d, card) == 1.0, "overlay opaque", timeout=5)


def read_download(downloads: Path, before: set[Path]) -> list[dict[str, str]]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        new = [p for p in downloads.glob("*.csv") if p not in before]
        if new:
            return list(csv.DictReader(io.StringIO(new[0].read_text())))
        time.sleep(0.1)
    raise AssertionError(f"no CSV downloaded into {downloads}")


# --- tests ---------------------------------------------------------------------------------------------------


def test_console_page_is_served_without_a_key(embedded: ServerThread) -> None:
    r = httpx.get(f"{embedded.url}/console", timeout=10)
    assert r.status_code == 200 and "default-src 'none'" in r.headers["content-security-policy"]
    assert httpx.get(f"{embedded.url}/v1/categories", timeout=10).status_code == 401  # the data does need one


def test_hostile_text_is_shown_as_text(driver: WebDriver, embedded: ServerThread) -> None:
    open_console(driver, embedded.url)
    choose(driver, "hostile", [SAMPLES / "metal_good.png"])
    descriptions = [li.text for li in by_testid(driver, "descriptions").find_elements(By.TAG_NAME, "li")]
    assert descriptions == [HOSTILE, "plain scratch"]
    option = Select(by_testid(driver, "category")).first_selected_option
    assert HOSTILE_NOUN in option.text and HOSTILE_NOUN in by_testid(driver, "category-info").text
    # the descriptions come back from the model as top types: rendered as text there too
    [card] = inspect(driver, 1)
    assert HOSTILE in by_testid(card, "top-types").text
    shot(driver, "hostile")
    assert driver.execute_script("return document.querySelectorAll('img[src=\"x\"], b').length") == 0
    assert_no_alert(driver)
    assert csp_violations(driver) == []


def test_inspect_boxes_opacity_history_and_csv(driver: WebDriver, embedded: ServerThread, downloads: Path) -> None:
    open_console(driver, embedded.url)
    samples = [SAMPLES / "fabric_stain.png", SAMPLES / "fabric_good.png"]
    choose(driver, "fabric", samples, grounding=True, top_k=3)
    cards = inspect(driver, 2)
    assert len(cards) == 2
    for card, sample in zip(cards, samples):
        expected = api_inspect(embedded.url, sample.name, "fabric", grounding=True, top_k=3)
        assert expected["boxes"], "grounding on: the demo detector always finds some boxes"
        assert by_testid(card, "file-name").text == sample.name
        check_result(driver, card, expected, top_k=3)
    check_opacity_slider(driver, cards[0])
    shot(driver, "embedded-grounding")

    # a second batch without grounding: no boxes drawn; the history keeps both batches
    choose(driver, "metal", [SAMPLES / "metal_scratch.png"], grounding=False, top_k=2)
    [card] = inspect(driver, 1)
    check_result(driver, card, api_inspect(embedded.url, "metal_scratch.png", "metal", False, 2), top_k=2)
    assert all_by_testid(card, "box") == []
    history = all_by_testid(driver, "history-item")
    assert [h.find_element(By.CLASS_NAME, "file-name").text for h in history] == [
        "metal_scratch.png", "fabric_good.png", "fabric_stain.png"]
    history[-1].click()  # reopen the oldest
    [reopened] = all_by_testid(driver, "result")
    assert by_testid(reopened, "file-name").text == "fabric_stain.png"
    assert len(all_by_testid(reopened, "box")) > 0 and overlay_width(driver, reopened) > 0

    calls = api_requests(driver, embedded.url)
    assert {u.removeprefix(embedded.url).split("?")[0] for u, _ in calls} >= {
        "/v1/categories", "/v1/categories/fabric", "/v1/inspect", "/readyz"}
    assert all(h.get("Authorization") == f"Bearer {API_KEY}" for _, h in calls), calls

    before = set(downloads.glob("*.csv"))
    by_testid(driver, "export-csv").click()
    rows = read_download(downloads, before)
    assert [r["file"] for r in rows] == ["fabric_stain.png", "fabric_good.png", "metal_scratch.png"]
    assert [r["category"] for r in rows] == ["fabric", "fabric", "metal"]
    assert all(r["verdict"] in ("OK", "NG") and float(r["score"]) > 0 and r["request_id"] for r in rows)
    assert csp_violations(driver) == []


DROP_SCRIPT = """
const [zone, done] = arguments;
const canvas = document.createElement("canvas");
canvas.width = 96; canvas.height = 64;
const ctx = canvas.getContext("2d");
ctx.fillStyle = "#808080"; ctx.fillRect(0, 0, 96, 64);
ctx.fillStyle = "#402010"; ctx.fillRect(30, 20, 12, 9);
canvas.toBlob((blob) => {
  const data = new DataTransfer();
  data.items.add(new File([blob], "dropped.png", {type: "image/png"}));
  zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: data, bubbles: true, cancelable: true}));
  zone.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
  done();
}, "image/png");
"""


def test_images_dropped_onto_the_page_are_inspected(driver: WebDriver, embedded: ServerThread) -> None:
    open_console(driver, embedded.url)
    Select(by_testid(driver, "category")).select_by_value("metal")
    driver.execute_async_script(DROP_SCRIPT, by_testid(driver, "dropzone"))
    wait_for(driver, lambda d: "dropped.png" in by_testid(d, "pending").text, "the dropped file listed", timeout=10)
    [card] = inspect(driver, 1)
    assert by_testid(card, "file-name").text == "dropped.png"
    assert by_testid(card, "verdict").text in ("OK", "NG") and overlay_width(driver, card) > 0


# --- the QA user's mends ---------------------------------------------------------------------------------------

# Wraps the page's fetch: each answer of POST v1/inspect (from the real server) gets the next of `overrides`
# merged in, so a test can pin top types, boxes or the threshold. A reload removes the wrapper.
STUB_INSPECT = """
const overrides = arguments[0];
const real = window.fetch;
let n = 0;
window.fetch = async function (url, options) {
  const response = await real.call(window, url, options);
  if (!String(url).endsWith("v1/inspect") || !response.ok || !overrides.length) return response;
  const body = await response.json();
  Object.assign(body, overrides[Math.min(n, overrides.length - 1)]);
  n += 1;
  return new Response(JSON.stringify(body), {status: response.status, headers: response.headers});
};
"""


def inspect_posts(driver: WebDriver, base: str) -> int:
    """POST /v1/inspect requests the page sent since the last look at the network log."""
    count = 0
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request = message["params"]["request"]
            count += request["method"] == "POST" and request["url"] == f"{base}/v1/inspect"
    return count


def rect(driver: WebDriver, element: WebElement) -> dict[str, float]:
    return driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                 "return {left: r.left, top: r.top, right: r.right, bottom: r.bottom,"
                                 " width: r.width, height: r.height};", element)


def selected_category(driver: WebDriver) -> str:
    return Select(by_testid(driver, "category")).first_selected_option.get_attribute("value")


def test_reopening_history_selects_its_category(driver: WebDriver, embedded: ServerThread) -> None:
    open_console(driver, embedded.url)
    choose(driver, "bolt", [SAMPLES / "bolt_good.png"])
    inspect(driver, 1)
    choose(driver, "metal", [SAMPLES / "metal_good.png"])
    inspect(driver, 1)
    assert selected_category(driver) == "metal"
    older = all_by_testid(driver, "history-item")[-1]
    older.click()
    [card] = all_by_testid(driver, "result")
    assert by_testid(card, "file-name").text == "bolt_good.png"
    assert selected_category(driver) == "bolt"  # the select, the descriptions and the facts follow the entry
    assert "noun: bolt" in by_testid(driver, "category-info").text
    assert driver.execute_script("return sessionStorage.getItem('filo.console.category')") == "bolt"
    assert all_by_testid(driver, "result") == [card]  # reopening is not a category change: nothing cleared


def test_changing_category_clears_results_and_is_remembered(driver: WebDriver, embedded: ServerThread) -> None:
    open_console(driver, embedded.url)
    choose(driver, "fabric", [SAMPLES / "fabric_good.png"])
    inspect(driver, 1)
    Select(by_testid(driver, "category")).select_by_value("washer")
    assert all_by_testid(driver, "result") == [] and all_by_testid(driver, "result-failed") == []
    assert by_testid(driver, "results-empty").is_displayed()  # the hint is back
    assert by_testid(driver, "progress").text == ""
    assert len(all_by_testid(driver, "history-item")) == 1  # the history keeps the fabric result

    driver.refresh()  # the key and the category live in the tab's sessionStorage
    wait_for(driver, lambda d: len(Select(by_testid(d, "category")).options) > 0, "categories after a reload")
    assert selected_category(driver) == "washer"
    assert "noun: washer" in by_testid(driver, "category-info").text

    # a remembered category the server no longer has: the first one, said so, no error
    driver.execute_script("sessionStorage.setItem('filo.console.category', 'gone_since')")
    driver.refresh()
    wait_for(driver, lambda d: len(Select(by_testid(d, "category")).options) > 0, "categories after a reload")
    first = Select(by_testid(driver, "category")).options[0].get_attribute("value")
    assert selected_category(driver) == first
    assert "gone_since" in by_testid(driver, "progress").text
    assert not by_testid(driver, "error").is_displayed()
    assert driver.execute_script("return sessionStorage.getItem('filo.console.category')") == first
    assert csp_violations(driver) == []


def test_inspect_never_sends_the_same_files_twice(driver: WebDriver, embedded: ServerThread) -> None:
    open_console(driver, embedded.url)
    choose(driver, "bolt", [SAMPLES / "bolt_good.png", SAMPLES / "bolt_crack.png"])
    inspect(driver, 2)
    button = by_testid(driver, "inspect")
    assert not button.is_enabled()
    assert by_testid(driver, "pending").find_elements(By.TAG_NAME, "li") == []
    # even a button forced back on sends nothing: the inspected files are no longer chosen
    driver.execute_script("arguments[0].disabled = false; arguments[0].click();", button)
    time.sleep(1.0)
    assert inspect_posts(driver, embedded.url) == 2
    assert len(all_by_testid(driver, "history-item")) == 2 and len(all_by_testid(driver, "result")) == 2
    # new files: the button is back, and only the new file goes
    by_testid(driver, "files").send_keys(str(SAMPLES / "bolt_good.png"))
    wait_for(driver, lambda d: by_testid(d, "inspect").is_enabled(), "Inspect enabled for new files", timeout=5)
    inspect(driver, 1)
    assert inspect_posts(driver, embedded.url) == 1 and len(all_by_testid(driver, "history-item")) == 3


def test_top_type_bars_share_one_fixed_scale(driver: WebDriver, embedded: ServerThread) -> None:
    open_console(driver, embedded.url)
    driver.execute_script(STUB_INSPECT, [
        {"top_types": [{"description": "dark stain", "similarity": 0.5},
                       {"description": "crack", "similarity": 0.25}]},
        {"top_types": [{"description": "thin scratch", "similarity": 0.9},
                       {"description": "round hole", "similarity": 0.5},
                       {"description": "dark hole", "similarity": -0.2}]},
    ])
    choose(driver, "metal", [SAMPLES / "metal_good.png", SAMPLES / "metal_scratch.png"])
    first, second = inspect(driver, 2)

    def bars(card: WebElement) -> dict[str, float]:
        out = {}
        for li in by_testid(card, "top-types").find_elements(By.TAG_NAME, "li"):
            track, bar = rect(driver, by_testid(li, "type-track")), rect(driver, by_testid(li, "type-bar"))
            out[li.find_element(By.CLASS_NAME, "type-name").text] = bar["width"] / track["width"]
        return out

    a, b = bars(first), bars(second)
    assert a["dark stain"] == pytest.approx(0.5, abs=0.01)  # 0.5 fills half, not the whole track
    assert b["round hole"] == pytest.approx(a["dark stain"], abs=0.005)  # the same value, the same width
    assert a["crack"] == pytest.approx(0.25, abs=0.01) and b["thin scratch"] == pytest.approx(0.9, abs=0.01)
    assert b["dark hole"] == 0.0  # a negative cosine: an empty bar, the value still printed
    assert "-0.200" in by_testid(second, "top-types").text


def test_heatmap_legend_shows_the_scale_and_the_threshold(driver: WebDriver, embedded: ServerThread) -> None:
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    open_console(driver, embedded.url)
    choose(driver, "fabric", [SAMPLES / "fabric_stain.png"])
    [card] = inspect(driver, 1)
    legend = by_testid(card, "legend")
    assert legend.is_displayed()
    assert by_testid(legend, "legend-min").text == "0" and by_testid(legend, "legend-max").text == "1"
    threshold = float(by_testid(card, "result-threshold").text)
    caption = by_testid(legend, "legend-caption").text
    assert f"threshold {threshold:.3f}" in caption and "image score" in caption and "fixed 0–1" in caption
    # the marker sits at the threshold on the 0..1 bar
    bar, marker = rect(driver, by_testid(legend, "legend-bar")), rect(driver, by_testid(legend, "legend-threshold"))
    centre = (marker["left"] + marker["right"]) / 2
    assert (centre - bar["left"]) / bar["width"] == pytest.approx(threshold, abs=1.5 / bar["width"])
    assert marker["top"] <= bar["top"] and marker["bottom"] >= bar["bottom"]
    # its colours are the server's (OpenCV's COLORMAP_JET, what the overlay kinds blend), within one level
    strip = driver.execute_script(
        "const c = arguments[0]; return Array.from(c.getContext('2d').getImageData(0, 0, c.width, 1).data);",
        by_testid(legend, "legend-bar"))
    rgb = np.array(strip, dtype=int).reshape(-1, 4)[:, :3]
    jet = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(1, 256), cv2.COLORMAP_JET)[0][:, ::-1]
    assert rgb.shape == (256, 3) and int(np.abs(rgb - jet.astype(int)).max()) <= 2
    shot(driver, "legend")


def test_box_labels_toggle_and_stay_inside_the_image(driver: WebDriver, embedded: ServerThread) -> None:
    w = h = 256  # the samples' size
    long_phrase = "long dark stain across the weave"
    open_console(driver, embedded.url)  # (a fresh tab state: labels on)
    driver.execute_script(STUB_INSPECT, [{"boxes": [
        {"phrase": long_phrase, "confidence": 0.91, "valid": True, "x1": w - 12, "y1": h - 6, "x2": w, "y2": h},
        {"phrase": "crack", "confidence": 0.5, "valid": True, "x1": 0, "y1": 0, "x2": 30, "y2": 20},
        {"phrase": "scratch", "confidence": 0.4, "valid": True, "x1": w - 40, "y1": 0, "x2": w, "y2": 10},
    ]}])
    choose(driver, "fabric", [SAMPLES / "fabric_stain.png"])
    [card] = inspect(driver, 1)
    wait_for(driver, lambda d: len(all_by_testid(card, "box-label")) == 3, "three labelled boxes", timeout=10)
    stage = rect(driver, card.find_element(By.CLASS_NAME, "stage"))
    for label in all_by_testid(card, "box-label"):
        r = rect(driver, label)
        assert r["width"] > 0 and r["height"] > 0
        inside = (r["left"] >= stage["left"] - 0.5 and r["right"] <= stage["right"] + 0.5
                  and r["top"] >= stage["top"] - 0.5 and r["bottom"] <= stage["bottom"] + 0.5)
        assert inside, (label.get_attribute("textContent"), r, stage)
    texts = [el.get_attribute("textContent") for el in all_by_testid(card, "box-label")]
    assert texts[0] == f"{long_phrase} 0.91"[:27] + "…"
    shot(driver, "box-labels")

    toggle = by_testid(driver, "box-labels")
    assert toggle.is_selected()
    toggle.click()
    assert not any(label.is_displayed() for label in all_by_testid(card, "box-label"))
    assert len(all_by_testid(card, "box")) == 3  # the boxes stay; their text is in the tooltip and the list
    assert len(all_by_testid(card, "box-item")) == 3
    all_by_testid(driver, "history-item")[0].click()  # reopened: still off
    [card] = all_by_testid(driver, "result")
    wait_for(driver, lambda d: len(all_by_testid(card, "box-label")) == 3, "labels redrawn", timeout=10)
    assert not any(label.is_displayed() for label in all_by_testid(card, "box-label"))
    by_testid(driver, "box-labels").click()
    assert all(label.is_displayed() for label in all_by_testid(card, "box-label"))


def test_landscape_tablet_puts_results_beside_the_controls(driver: WebDriver, embedded: ServerThread) -> None:
    open_console(driver, embedded.url)
    choose(driver, "washer", [SAMPLES / "washer_good.png"])
    inspect(driver, 1)
    try:
        driver.set_window_size(1024, 768)
        wait_for(driver, lambda d: d.execute_script("return window.innerWidth") <= 1024, "a 1024 px window", 5)
        controls = rect(driver, driver.find_element(By.CSS_SELECTOR, ".layout > .controls"))
        results = rect(driver, by_testid(driver, "results"))
        history = rect(driver, driver.find_element(By.CSS_SELECTOR, ".layout > .history-panel"))
        assert results["left"] >= controls["right"] and results["top"] < controls["bottom"]  # side by side
        assert abs(results["top"] - controls["top"]) < 2
        assert results["right"] <= driver.execute_script("return document.documentElement.clientWidth") + 0.5
        assert results["width"] > 500  # the image and its facts have room
        assert history["top"] >= controls["bottom"]  # under the controls
        card = rect(driver, by_testid(driver, "result"))
        assert card["left"] >= controls["right"]
        shot(driver, "tablet-1024")

        driver.set_window_size(420, 900)  # a phone: stacked, results under the controls
        wait_for(driver, lambda d: d.execute_script("return window.innerWidth") <= 420, "a 420 px window", 5)
        controls = rect(driver, driver.find_element(By.CSS_SELECTOR, ".layout > .controls"))
        results = rect(driver, by_testid(driver, "results"))
        history = rect(driver, driver.find_element(By.CSS_SELECTOR, ".layout > .history-panel"))
        assert results["top"] >= controls["bottom"] and history["top"] >= results["bottom"]
        assert abs(results["left"] - controls["left"]) < 2
        shot(driver, "phone-420")
    finally:
        driver.set_window_size(1440, 1000)


def test_errors_are_readable(driver: WebDriver, embedded: ServerThread, tmp_path: Path) -> None:
    open_console(driver, embedded.url)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image at all")
    cut = tmp_path / "cut.png"
    cut.write_bytes((SAMPLES / "bolt_good.png").read_bytes()[:5000])
    choose(driver, "fabric", [notes, cut, SAMPLES / "fabric_good.png"])
    cards = inspect(driver, 3)
    assert len(cards) == 1  # the two bad files failed alone; the image after them was still inspected
    failed = [c.text for c in all_by_testid(driver, "result-failed")]
    assert failed[0].startswith("notes.txt is not an image the service can read\n")
    assert failed[1].startswith("cut.png was refused\n") and "truncated" in failed[1].lower()
    assert by_testid(driver, "error").is_displayed()  # the banner tells the latest
    assert by_testid(driver, "error-title").text == "cut.png was refused"
    assert by_testid(driver, "error-code").text == "HTTP 422 · truncated_image"
    shot(driver, "error-415-422")

    field = by_testid(driver, "api-key")
    field.clear()
    field.send_keys("wrong-key" + Keys.ENTER)
    wait_for(driver, lambda d: by_testid(d, "error-title").text == "API key not accepted", "the 401 explained")
    assert "wrong api key" in by_testid(driver, "error-message").text.lower()
    assert by_testid(driver, "error-code").text == "HTTP 401 · unauthorized"
    assert driver.execute_script("return sessionStorage.getItem('filo.console.apiKey')") == "wrong-key"
    assert "wrong-key" not in driver.current_url
    shot(driver, "error-401")


def good_variants(tmp_path: Path, sample: str) -> list[Path]:
    """Three more good parts: the good sample mirrored and turned."""
    good = Image.open(SAMPLES / sample)
    paths = []
    for i, turn in enumerate([Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM,
                              Image.Transpose.ROTATE_180]):
        paths.append(tmp_path / f"{Path(sample).stem}_{i}.png")
        good.transpose(turn).save(paths[-1])
    return paths


def register_and_calibrate(driver: WebDriver, url: str, category: str, files: list[Path], total: int) -> dict:
    """Admin panel: register the ticked results plus `files`, calibrate; returns GET /v1/categories/{name}."""
    by_testid(driver, "reference-files").send_keys("\n".join(str(p) for p in files))
    by_testid(driver, "register-references").click()
    wait_for(driver, lambda d: "now holds" in by_testid(d, "admin-status").text, "references registered")
    assert not by_testid(driver, "error").is_displayed()
    auth = {"Authorization": f"Bearer {API_KEY}"}
    held = httpx.get(f"{url}/v1/categories/{category}/references", headers=auth, timeout=10).json()
    assert held["references"] == total and by_testid(driver, "reference-count").text == str(total)

    by_testid(driver, "calibrate").click()
    wait_for(driver, lambda d: f"New {category} threshold" in by_testid(d, "admin-status").text, "calibrated")
    detail = httpx.get(f"{url}/v1/categories/{category}", headers=auth, timeout=10).json()
    assert detail["threshold_source"] == "references" and detail["references"] == total
    assert by_testid(driver, "threshold").text == f"{detail['threshold']:.3f}"
    assert by_testid(driver, "threshold-source").text == "calibrated from good references"
    return detail


def check_calibrated_verdict(driver: WebDriver, url: str, category: str, sample: str, detail: dict) -> None:
    choose(driver, category, [SAMPLES / sample])
    [card] = inspect(driver, 1)
    expected = api_inspect(url, sample, category, False, 3)
    assert expected["threshold_source"] == "references" and expected["references"] == detail["references"]
    assert by_testid(card, "result-threshold").text == f"{detail['threshold']:.3f}"
    used = f"calibrated from good references, {detail['references']} references used"
    assert used in by_testid(card, "result-threshold-source").text
    assert by_testid(card, "verdict").text == ("NG" if expected["is_anomalous"] else "OK")
    assert by_testid(card, "score").text == f"{expected['score']:.3f}"


def test_admin_registers_references_and_calibrates(driver: WebDriver, embedded: ServerThread,
                                                    tmp_path: Path) -> None:
    open_console(driver, embedded.url)
    choose(driver, "washer", [SAMPLES / "washer_good.png"])
    [card] = inspect(driver, 1)
    by_testid(card, "reference-pick").click()  # this inspected good part becomes a reference too
    driver.find_element(By.CSS_SELECTOR, '[data-testid="admin"] > summary').click()
    admin = by_testid(driver, "admin-key")

    admin.send_keys(API_KEY)  # an inspection key may not write
    by_testid(driver, "register-references").click()
    wait_for(driver, lambda d: by_testid(d, "admin-error-title").text == "Not allowed", "the 403 explained",
             timeout=20)
    assert not by_testid(driver, "error").is_displayed()  # beside the admin buttons, not in the page-top banner
    admin.clear()
    admin.send_keys("wrong-admin")
    by_testid(driver, "calibrate").click()
    wait_for(driver, lambda d: by_testid(d, "admin-error-title").text == "Admin key not accepted", "the 401",
             timeout=20)
    assert by_testid(driver, "reference-count").text == "0"

    admin.clear()
    admin.send_keys(ADMIN_KEY)
    detail = register_and_calibrate(driver, embedded.url, "washer", good_variants(tmp_path, "washer_good.png"), 4)
    driver.execute_script("arguments[0].scrollIntoView()", by_testid(driver, "admin"))
    shot(driver, "admin")
    check_calibrated_verdict(driver, embedded.url, "washer", "washer_missing.png", detail)

    remove = by_testid(driver, "clear-references")
    remove.click()  # arms the button
    assert "Click again" in remove.text and by_testid(driver, "reference-count").text == "4"
    remove.click()
    wait_for(driver, lambda d: "zero-shot again" in by_testid(d, "admin-status").text, "references removed")
    assert by_testid(driver, "reference-count").text == "0"
    wait_for(driver, lambda d: by_testid(d, "threshold-source").text == "server default", "default threshold back")
    assert api_inspect(embedded.url, "washer_missing.png", "washer", False, 3)["references"] == 0


class GatedEngine:
    """The real demo engine whose batches wait while `gate` is closed: a full queue on demand."""

    def __init__(self, engine: object, gate: threading.Event) -> None:
        self._engine = engine
        self._gate = gate

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def inspect_batch(self, requests: list) -> list:
        self._gate.wait(60)
        return self._engine.inspect_batch(requests)


def test_busy_and_loading_servers_are_explained(driver: WebDriver, tmp_path: Path) -> None:
    """503 while the model loads (the page retries by itself), then 429 with Retry-After when the queue is full."""
    loaded, running = threading.Event(), threading.Event()
    running.set()

    def factory(settings: FiloSettings) -> GatedEngine:
        loaded.wait(60)
        return GatedEngine(default_engine_factory(settings), running)

    settings = demo_settings(state_dir=tmp_path, api_keys=[API_KEY], descriptions=[SAMPLES / "descriptions.json"],
                             queue_max_depth=1, max_batch_size=1, max_wait_ms=0)
    backend = EmbeddedBackend(settings, engine_factory=factory)
    with ServerThread(create_app(settings, backend)) as srv:
        driver.get(srv.url + "/console")
        field = by_testid(driver, "api-key")
        field.send_keys(API_KEY + Keys.ENTER)
        wait_for(driver, lambda d: by_testid(d, "error-title").text == "The service is not ready", "the 503")
        assert by_testid(driver, "error-code").text == "HTTP 503 · not_ready"
        assert "still loading" in by_testid(driver, "error-message").text
        assert "retries by itself" in by_testid(driver, "error-message").text
        shot(driver, "error-503")
        loaded.set()
        wait_ready(srv.url)
        wait_for(driver, lambda d: len(Select(by_testid(d, "category")).options) > 0, "categories after loading")
        assert not by_testid(driver, "error").is_displayed()

        running.clear()  # one request runs (and waits), one waits in the queue: the next is refused
        ahead = [threading.Thread(target=api_inspect, args=(srv.url, "bolt_good.png", "bolt", False, 1))
                 for _ in range(2)]
        for t in ahead:
            t.start()
            time.sleep(0.3)
        try:
            wait_for(driver, lambda d: backend._batcher.depth == 2, "one request running, one queued", timeout=20)
            choose(driver, "bolt", [SAMPLES / "bolt_crack.png"])
            inspect(driver, 1)
            assert by_testid(driver, "error-title").text == "The service is busy"
            assert by_testid(driver, "error-code").text == "HTTP 429 · queue_full"
            assert re.search(r"Try again in \d+ s\.", by_testid(driver, "error-message").text)
            shot(driver, "error-429")
        finally:
            running.set()
            for t in ahead:
                t.join(60)


@contextmanager
def queue_server(redis_url: str, pool: WorkerPool, **overrides: Any) -> Iterator[ServerThread]:
    """One demo worker and an API on `redis_url`; `overrides` are API settings (keys, records...)."""
    desc = json.dumps([str(SAMPLES / "descriptions.json")])
    worker = pool.start(redis_url, FILO_DESCRIPTIONS=desc)
    settings = demo_settings(**{"redis_url": redis_url, "api_keys": [API_KEY], "admin_key": ADMIN_KEY,
                                "descriptions": [SAMPLES / "descriptions.json"], **overrides})
    with ServerThread(create_app(settings, RedisBackend(settings))) as api:
        pool.wait_ready(worker)
        wait_ready(api.url)
        yield api


@pytest.mark.redis
def test_queue_mode_core_and_admin_flow(driver: WebDriver, redis_server: RedisServer,  # noqa: F811
                                        worker_pool: WorkerPool, tmp_path: Path) -> None:  # noqa: F811
    redis_server.client().flushall()
    with queue_server(redis_server.url, worker_pool) as api:
        open_console(driver, api.url)
        choose(driver, "washer", [SAMPLES / "washer_missing.png"], top_k=3)
        [card] = inspect(driver, 1)
        check_result(driver, card, api_inspect(api.url, "washer_missing.png", "washer", False, 3), top_k=3)
        check_opacity_slider(driver, card)
        assert len(all_by_testid(driver, "history-item")) == 1
        shot(driver, "queue-mode")

        # admin in queue mode: the references reach the worker before the answer comes back
        driver.find_element(By.CSS_SELECTOR, '[data-testid="admin"] > summary').click()
        by_testid(driver, "admin-key").send_keys(ADMIN_KEY)
        files = [SAMPLES / "washer_good.png", *good_variants(tmp_path, "washer_good.png")[:2]]
        detail = register_and_calibrate(driver, api.url, "washer", files, 3)
        check_calibrated_verdict(driver, api.url, "washer", "washer_missing.png", detail)
        assert len(all_by_testid(driver, "history-item")) == 2
        assert csp_violations(driver) == []
