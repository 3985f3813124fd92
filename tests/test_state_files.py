"""Every state file the service creates is its owner's only: a real embedded server writes its catalog, caches,
category extras, an LLM draft and its records database (every kept image) under a state directory that did not
exist, with the usual umask 022, and finds each file 0600 and each directory 0700."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api.app import create_app
from service.backends.embedded import EmbeddedBackend
from tests.service_fixtures import ServerThread, demo_settings, png_bytes, wait_until
from tests.test_llm import FakeLLM, llm  # noqa: F401

ADMIN = {"Authorization": "Bearer admin-1"}


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Every path under `root` (and `root`), relative, with its permission bits."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return found


def test_state_files_are_owner_only(tmp_path: Path, llm: FakeLLM, umask_022: None) -> None:  # noqa: F811
    state = tmp_path / "home" / "state"
    settings = demo_settings(state_dir=state, admin_key="admin-1", records_keep="all", llm_base_url=llm.url)
    with ServerThread(create_app(settings, EmbeddedBackend(settings))) as srv, \
            httpx.Client(base_url=srv.url, headers=ADMIN, timeout=60) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, 120, what="embedded server ready")
        assert client.put("/v1/categories/gasket", json={"descriptions": ["torn edge", "dent"]}).status_code == 200
        assert client.put("/v1/categories/gasket/threshold", json={"threshold": 0.4}).status_code == 200
        r = client.put("/v1/categories/gasket/references", files=[("images", ("a.png", png_bytes(48, 48, seed=1)))])
        assert r.status_code == 200, r.text
        assert client.put("/v1/categories/washer", json={"generate": True, "count": 2}).status_code == 202
        rid = client.post("/v1/inspect", data={"category": "gasket"},
                          files={"image": ("x.png", png_bytes(40, 40))}).json()["request_id"]
        wait_until(lambda: client.get(f"/v1/inspections/{rid}").status_code == 200, 10, what="the record")
        found = modes(state)
    expected = {"records.db", "records.db-wal", "records.db-shm", "categories.json", "drafts/washer.json"}
    assert expected <= set(found), sorted(found)
    assert any(p.startswith("caches/") for p in found) and any(p.startswith("category-extras/") for p in found)
    loose = {p: oct(m) for p, m in found.items() if m != (0o700 if (state / p).is_dir() else 0o600)}
    assert loose == {}, loose
    assert stat.S_IMODE((tmp_path / "home").stat().st_mode) == 0o700  # a missing parent is made private too
