"""The QA console without a browser: routes, security headers, and what the static files may contain."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.routes.console import STATIC_FILES
from service.backends.redis_queue import RedisBackend
from service.console import STATIC_DIR
from tests.service_fixtures import REPO, demo_settings

# The hooks the browser tests (and anyone automating the page) rely on.
TEST_IDS = {
    "api-key", "category", "files", "inspect", "result", "verdict", "score", "overlay", "opacity", "top-types",
    "history", "descriptions", "admin-key", "register-references", "calibrate", "reference-count", "threshold",
    "error", "export-csv", "boxes", "grounding", "top-k", "clear-references", "reference-files",
    # the Review and Trends views and the admin threshold controls (tests/test_console_review.py)
    "tab-inspect", "tab-review", "tab-trends", "review-category", "reviewer-key", "review-queue", "review-detail",
    "review-error", "review-done", "review-more", "trends-category", "trends-bucket", "trends-table", "records-table",
    "trends-export", "chart-ng", "chart-false", "admin-error", "admin-error-learn", "manual-threshold",
    "review-margin", "set-threshold", "learn-preview", "learn-apply", "learn-plan", "threshold-history",
}
# In load order: the shared library first, then the views that use it.
SCRIPTS = ["lib.js", "inspect.js", "tabs.js", "review.js", "trends.js", "admin.js"]


@pytest.fixture(scope="module")
def client() -> TestClient:
    """The real app with keys configured; the lifespan never runs, so no model and no Redis are needed."""
    settings = demo_settings(api_keys=["k"], admin_key="a", redis_url="redis://127.0.0.1:1/0")
    return TestClient(create_app(settings, RedisBackend(settings)))


def _policy(header: str) -> dict[str, list[str]]:
    directives = {}
    for part in header.split(";"):
        name, *values = part.split()
        directives[name] = values
    return directives


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.script_text.append(data)


def _html() -> _Collect:
    parser = _Collect()
    parser.feed((STATIC_DIR / "index.html").read_text())
    return parser


# --- routes and headers ----------------------------------------------------------------------------------------


def test_root_leads_to_the_console(client: TestClient) -> None:
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "console"


def test_page_and_files_load_without_a_key_with_strict_headers(client: TestClient) -> None:
    for path, media in [("/console", "text/html"), *((f"/console/static/{n}", t.split(";")[0])
                                                    for n, t in STATIC_FILES.items())]:
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(media)
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["content-security-policy"] == client.get("/console").headers["content-security-policy"]
    assert client.get("/v1/categories").status_code == 401  # the page is open, the data is not


def test_csp_is_strict(client: TestClient) -> None:
    header = client.get("/console").headers["content-security-policy"]
    csp = _policy(header)
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"]
    assert sorted(csp["img-src"]) == sorted(["'self'", "data:", "blob:"])
    assert csp["frame-ancestors"] == ["'none'"] and csp["object-src"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert csp["require-trusted-types-for"] == ["'script'"]
    for loose in ("'unsafe-inline'", "'unsafe-eval'", "*", "http:", "https:", "'unsafe-hashes'"):
        assert loose not in header.split(), loose


def test_only_the_listed_files_are_served(client: TestClient) -> None:
    for name in ["index.html", "__init__.py", "..%2F__init__.py", "../../api/app.py", "console.JS", "missing.js"]:
        r = client.get(f"/console/static/{name}")
        assert r.status_code == 404, name
        assert r.json()["error"]["code"] == "not_found"
    assert client.get("/console/../service/settings.py").status_code == 404


def test_console_is_not_in_the_openapi_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/console")]


# --- the files themselves --------------------------------------------------------------------------------------


def test_html_has_no_inline_code_or_style_and_loads_only_local_files() -> None:
    page = _html()
    assert page.script_text == []
    scripts = [a for t, a in page.tags if t == "script"]
    assert [s.get("src") for s in scripts] == [f"console/static/{name}" for name in SCRIPTS]
    assert all("defer" in s for s in scripts)  # in this order, after the page is parsed
    assert not [t for t, _ in page.tags if t == "style"]
    for tag, attrs in page.tags:
        assert "style" not in attrs, tag
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        for name in ("src", "href", "action"):
            value = attrs.get(name) or ""
            assert not re.match(r"^([a-z]+:)?//|^javascript:", value, re.I), (tag, name, value)


def test_every_test_hook_exists() -> None:
    ids = {a["data-testid"] for _, a in _html().tags if a.get("data-testid")}
    assert ids >= TEST_IDS, TEST_IDS - ids
    category = [t for t, a in _html().tags if a.get("data-testid") == "category"]
    assert category == ["select"]
    files = [a for _, a in _html().tags if a.get("data-testid") == "files"]
    assert files[0]["type"] == "file" and "multiple" in files[0]


def test_every_hook_the_browser_tests_use_exists() -> None:
    """Each data-testid the browser tests look for is in the page or made by the page's JavaScript."""
    made = {a["data-testid"] for _, a in _html().tags if a.get("data-testid")}
    for script in STATIC_DIR.glob("*.js"):
        js = script.read_text()
        made |= set(re.findall(r"dataset\.testid\s*=\s*[\"']([\w-]+)[\"']", js))
        made |= set(re.findall(r"[\"']data-testid[\"']\s*:\s*[\"']([\w-]+)[\"']", js))
    tests = (REPO / "tests" / "test_console_browser.py").read_text()
    used = set(re.findall(r"by_testid\(\w+, \"([\w-]+)\"\)", tests))
    used |= set(re.findall(r"data-testid=\"([\w-]+)\"", tests))
    assert len(used) > 20 and used <= made, sorted(used - made)


def _code(js: str) -> str:
    """The JavaScript without its comments, so a comment that names a sink is not a hit."""
    js = re.sub(r"/\*.*?\*/", "", js, flags=re.S)
    return "\n".join(line.split("// ")[0] if line.lstrip().startswith("//") or " // " in line else line
                     for line in js.splitlines())


@pytest.mark.parametrize("name", SCRIPTS)
def test_javascript_never_parses_html_or_evaluates_strings(name: str) -> None:
    js = _code((STATIC_DIR / name).read_text())
    for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "createContextualFragment", "DOMParser", "srcdoc", ".setAttribute(\"on", "setAttribute('on"]:
        assert sink not in js, sink
    assert not re.search(r"set(Timeout|Interval)\(\s*[\"'`]", js), "a timer with a string is eval"
    assert not re.search(r"setAttribute\(\s*[\"']style", js), "style attributes need 'unsafe-inline'"
    assert "localStorage" not in js  # the keys live for the tab only (sessionStorage)
    calls = re.findall(r"\bfetch\(([^;]*)", js)
    assert all("headers" in c for c in calls), calls  # every call carries the key (authHeaders)
    if name == "lib.js":  # the one that calls fetch (`api`); the others go through it
        assert calls
    else:
        assert not calls
    assert "XMLHttpRequest" not in js and "sendBeacon" not in js and "WebSocket" not in js


def test_no_outside_resources() -> None:
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        urls = set(re.findall(r"https?://[^\s\"'`)]+", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)
        assert "@import" not in text and "@font-face" not in text, path.name


def test_css_has_no_remote_urls() -> None:
    css = (STATIC_DIR / "console.css").read_text()
    assert "url(" not in css


def test_every_script_is_served() -> None:
    assert {p.name for p in STATIC_DIR.glob("*.js")} == set(SCRIPTS) <= set(STATIC_FILES)


def test_static_files_ship_as_package_data() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["service.console"]
    shipped = {p.name for pattern in patterns for p in STATIC_DIR.parent.glob(pattern)}
    assert shipped == {p.name for p in STATIC_DIR.iterdir()}
    assert set(STATIC_FILES) | {"index.html"} == shipped
    assert (Path(STATIC_DIR).parent / "__init__.py").exists()
