"""`filo learn`: the learn workflow of `POST /v1/categories/{name}/learn`, run from the command line over an
embedded server's state (its categories, references and records database)."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from PIL import Image

from service.cli import main
from tests.conftest import synthetic_image
from tests.service_fixtures import ServerThread, demo_settings, wait_ready, wait_until

ADMIN = {"Authorization": "Bearer admin-l"}


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(200, 240, seed=seed)).save(buf, format="PNG")
    return buf.getvalue()


def _serve(state_dir):
    from service.api.app import create_app
    from service.backends.embedded import EmbeddedBackend

    settings = demo_settings(state_dir=state_dir, admin_key="admin-l", records_keep="all")
    return ServerThread(create_app(settings, EmbeddedBackend(settings)))


@pytest.mark.slow
def test_filo_learn_runs_the_api_workflow_on_the_command_line(tmp_path, monkeypatch, capsys):
    with _serve(tmp_path) as srv:
        wait_ready(srv.url)
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            ids = []
            for seed in range(4):
                r = client.post("/v1/inspect", data={"category": "bottle", "heatmap": "none"},
                                files={"image": ("x.png", _png(900 + seed), "image/png")})
                assert r.status_code == 200, r.text
                ids.append(r.json()["request_id"])
            wait_until(lambda: all(client.get(f"/v1/inspections/{i}").status_code == 200 for i in ids), 60,
                       what="the records")
            for i, label in zip(ids, ["good", "defect", "good", "defect"], strict=True):
                assert client.post(f"/v1/inspections/{i}/review", headers=ADMIN, json={"label": label}).status_code == 200
            planned = client.post("/v1/categories/bottle/learn", headers=ADMIN, params={"dry_run": "true"}).json()
    for name in ("FILO_PROFILE", "FILO_GROUNDING", "FILO_RECORDS_KEEP"):
        monkeypatch.setenv(name, {"FILO_PROFILE": "demo", "FILO_GROUNDING": "false", "FILO_RECORDS_KEEP": "all"}[name])
    common = ["--state-dir", str(tmp_path), "--image-size", "224"]

    assert main(["learn", "bottle", "--dry-run", *common]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry == planned  # the same workflow: the same plan
    assert dry["dry_run"] and dry["reviewed"] == 4 and dry["threshold"]["source"] == "learned"

    assert main(["learn", "bottle", *common]) == 0
    done = json.loads(capsys.readouterr().out)
    assert not done["dry_run"] and done["threshold"]["how"].startswith("kept images scored again")
    assert main(["learn", "nope", *common]) == 1
    assert "unknown_category" in capsys.readouterr().err

    with _serve(tmp_path) as srv:  # the server reads what the command wrote
        wait_ready(srv.url)
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            now = client.get("/v1/categories/bottle/thresholds").json()
            assert now["current"]["source"] == "learned"
            assert now["current"]["threshold"] == pytest.approx(done["threshold"]["after"])
            assert now["history"][0]["actor"].startswith("cli:") and now["history"][0]["source"] == "learned"
