"""`filo loadtest` against a real embedded server: every request sent is answered."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from filo_lab.bench.load_client import is_loopback_url, percentile
from service.api.app import create_app
from service.backends.embedded import EmbeddedBackend
from service.cli import main as cli_main
from tests.service_fixtures import ServerThread, demo_settings, png_bytes, wait_ready


def test_only_loopback_targets(capsys: pytest.CaptureFixture) -> None:
    for url in ("http://127.0.0.1:8000", "http://127.8.9.10", "http://localhost:1", "http://[::1]:8000"):
        assert is_loopback_url(url), url
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://[2001:db8::1]/", "http://0.0.0.0:8000"):
        assert not is_loopback_url(url), url
        assert cli_main(["loadtest", "--url", url, "--requests", "1"]) == 2
    assert "only 127.0.0.0/8" in capsys.readouterr().err


def test_percentile() -> None:
    values = sorted(float(v) for v in range(1, 101))
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50, 95, 99)
    assert percentile([], 50) == 0.0 and percentile([7.0], 99) == 7.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    settings = demo_settings(state_dir=tmp_path_factory.mktemp("state"), max_batch_size=4)
    with ServerThread(create_app(settings, EmbeddedBackend(settings))) as srv:
        wait_ready(srv.url)
        yield srv


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict]:
    rc = cli_main(["loadtest", "--json", *args])
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_request_bound(server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = tmp_path / "img.png"
    image.write_bytes(png_bytes(64, 64))
    rc, report = _run(capsys, "--url", server.url, "--concurrency", "3", "--requests", "9", "--duration", "120",
                      "--category", "bottle", "--image", str(image))
    assert rc == 0, report
    assert report["sent"] == report["answered"] == report["ok"] == 9 and report["lost"] == 0
    assert report["throughput_rps"] > 0 and report["latency_ms"]["p99"] >= report["latency_ms"]["p50"] > 0


def test_duration_bound_and_error_codes(server: ServerThread, capsys: pytest.CaptureFixture) -> None:
    rc, report = _run(capsys, "--url", server.url, "--concurrency", "2", "--requests", "100000", "--duration", "1.5",
                      "--category", "no-such-category")
    assert rc == 0 and report["lost"] == 0 and 0 < report["sent"] < 100000
    assert report["errors"] == {"404:unknown_category": report["sent"]}
