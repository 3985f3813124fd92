"""Takes docs/console.md's screenshots of the QA console (docs/console.png, docs/console-review.png,
docs/console-trends.png) from a real run on the samples.

Starts `filo serve --embedded --profile demo` with the sample categories exactly as docs/console.md says,
opens http://127.0.0.1:PORT/console in Debian's headless Chromium (driver path explicit: nothing is
downloaded), registers a good fabric part (and three mirrored copies) as references and calibrates
from them in the admin panel, inspects two fabric samples and saves the window. Then (unless --no-views)
it records metal and bolt results made NG by thresholds set by hand (through the API, with a line name as
`source`), judges two bolt results, and saves the Review view (one more result judged with the `g` key)
and the Trends view. Needs `chromium` and `chromium-driver` (apt-get) and the dev extra (selenium).

    python scripts/console_screenshot.py [--out docs/console.png] [--port 8765] [--no-views]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def _testid(driver: webdriver.Chrome, testid: str):
    return driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready within {timeout} s")


def _browser(profile: str) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)


def _good_parts(folder: Path, sample: Path) -> list[Path]:
    """The good sample and three mirrored/turned copies: four normal references."""
    image = Image.open(sample)
    paths = [sample]
    for i, turn in enumerate([Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM,
                              Image.Transpose.ROTATE_180]):
        paths.append(folder / f"{sample.stem}_{i}.png")
        image.transpose(turn).save(paths[-1])
    return paths


def _calibrate(driver: webdriver.Chrome, wait: WebDriverWait, references: list[Path], category: str) -> None:
    """Through the admin panel, as a person would: register the good parts, calibrate from them."""
    driver.find_element(By.CSS_SELECTOR, '[data-testid="admin"] > summary').click()
    _testid(driver, "reference-files").send_keys("\n".join(str(p) for p in references))
    _testid(driver, "register-references").click()
    wait.until(lambda d: "now holds" in _testid(d, "admin-status").text)
    _testid(driver, "calibrate").click()
    wait.until(lambda d: f"New {category} threshold" in _testid(d, "admin-status").text)
    driver.find_element(By.CSS_SELECTOR, '[data-testid="admin"] > summary').click()


def _open_console(driver: webdriver.Chrome, page: str, timeout_s: float) -> WebDriverWait:
    """The console at the screenshots' window size, once it lists the categories; the wait for what follows."""
    driver.set_window_size(1440, 1000)
    driver.get(page)
    wait = WebDriverWait(driver, timeout_s, poll_frequency=0.2)
    wait.until(lambda d: len(Select(_testid(d, "category")).options) > 0)
    return wait


def shoot(url: str, out: Path, samples: list[Path], category: str, good: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="filo-shot-") as profile:
        driver = _browser(profile)
        try:
            wait = _open_console(driver, f"{url}/console", 300)
            Select(_testid(driver, "category")).select_by_value(category)
            if good is not None:
                _calibrate(driver, wait, _good_parts(Path(profile), good), category)
            _testid(driver, "files").send_keys("\n".join(str(p) for p in samples))
            _testid(driver, "inspect").click()
            wait.until(lambda d: "inspected" in _testid(d, "progress").text)
            wait.until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('[data-testid=overlay]')].every(i => i.naturalWidth > 0)"))
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
            # a 256-colour palette: the docs image at under half the size, no visible loss
            Image.open(out).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT,
                                                    dither=Image.Dither.NONE).save(out, optimize=True)
        finally:
            driver.quit()


def _save(driver: webdriver.Chrome, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out))
    Image.open(out).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT,
                                            dither=Image.Dither.NONE).save(out, optimize=True)


def _records_for_views(url: str, folder: Path) -> None:
    """NG results to review: thresholds by hand (metal with a review margin), images from two lines."""
    with httpx.Client(base_url=url, timeout=120) as client:
        for category, body in (("metal", {"threshold": 0.0, "review_margin": 0.02}), ("bolt", {"threshold": 0.0})):
            client.put(f"/v1/categories/{category}/threshold", json=body).raise_for_status()
        metal = [SAMPLES / "metal_good.png", *_good_parts(folder, SAMPLES / "metal_good.png")[1:3],
                 SAMPLES / "metal_scratch.png"]
        ids = {}
        for i, path in enumerate([SAMPLES / "bolt_crack.png", SAMPLES / "bolt_good.png", *metal]):
            category = path.stem.split("_")[0]
            r = client.post("/v1/inspect", data={"category": category, "source": f"line-{1 + i % 2}"},
                            files={"image": (path.name, path.read_bytes(), "image/png")})
            r.raise_for_status()
            ids[path.name] = r.json()["request_id"]
        deadline = time.monotonic() + 60
        while len(client.get("/v1/inspections?limit=500").json()["items"]) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.2)  # records are written off the request's path
        client.post(f"/v1/inspections/{ids['bolt_crack.png']}/review",
                    json={"label": "defect", "defect_type": "crack"}).raise_for_status()
        client.post(f"/v1/inspections/{ids['bolt_good.png']}/review",
                    json={"label": "good", "note": "thread shadow"}).raise_for_status()


def shoot_views(url: str, review_out: Path, trends_out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="filo-shot-") as profile:
        _records_for_views(url, Path(profile))
        driver = _browser(profile)
        try:
            wait = _open_console(driver, f"{url}/console#review", 120)
            Select(_testid(driver, "review-category")).select_by_value("metal")
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="review-item"]')) == 4)
            wait.until(lambda d: d.execute_script("const i = document.querySelector('[data-testid=review-image]');"
                                                  "return i && i.complete && i.naturalWidth > 0"))
            driver.find_element(By.TAG_NAME, "body").send_keys("g")  # one judged with the key
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="review-item"]')) == 3)
            _testid(driver, "review-defect-type").send_keys("scratch", Keys.ESCAPE)
            wait.until(lambda d: d.execute_script(
                "const i = document.querySelector('[data-testid=review-heatmap]'); return i && i.naturalWidth > 0"))
            _save(driver, review_out)
            _testid(driver, "tab-trends").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="trends-total"]'))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="record-row"]'))
            _save(driver, trends_out)
        finally:
            driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "console.png")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--category", default="fabric")
    parser.add_argument("--good", type=Path, default=SAMPLES / "fabric_good.png",
                        help="a good part: it and three mirrored copies become references before inspecting")
    parser.add_argument("--zero-shot", action="store_true", help="no references, the default threshold")
    parser.add_argument("--review-out", type=Path, default=REPO / "docs" / "console-review.png")
    parser.add_argument("--trends-out", type=Path, default=REPO / "docs" / "console-trends.png")
    parser.add_argument("--no-views", action="store_true", help="only the Inspect view (docs/console.png)")
    parser.add_argument("samples", nargs="*", type=Path,
                        default=[SAMPLES / "fabric_stain.png", SAMPLES / "fabric_good.png"])
    args = parser.parse_args()
    env = {**os.environ, "FILO_DESCRIPTIONS": json.dumps([str(SAMPLES / "descriptions.json")])}
    with tempfile.TemporaryDirectory(prefix="filo-shot-state-") as state:
        env["FILO_STATE_DIR"] = state
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--embedded", "--profile", "demo",
                                   "--port", str(args.port)], cwd=REPO, env=env)
        url = f"http://127.0.0.1:{args.port}"
        try:
            _wait_ready(url, server)
            good = None if args.zero_shot else args.good.resolve()
            shoot(url, args.out, [p.resolve() for p in args.samples], args.category, good)
            if not args.no_views:
                shoot_views(url, args.review_out, args.trends_out)
        finally:
            server.terminate()
            server.wait(30)
    print(f"saved {args.out}" + ("" if args.no_views else f", {args.review_out}, {args.trends_out}"))


if __name__ == "__main__":
    main()
