"""Stand-in weights (filo_lab/standin.py, models/standin.py): the real formats, deterministic, and never silent."""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import load_file

from filo_lab.standin import CLIP_FILE, FILO_FILE, GROUNDING_DIR, production_env, write_standin_weights
from models.standin import read_standin_record
from service.api.app import create_app
from service.api.schemas import ModelInfoOut
from service.backends.embedded import EmbeddedBackend
from service.settings import FiloSettings
from tests.conftest import synthetic_image
from tests.service_fixtures import ServerThread, png_bytes, wait_ready


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    out = tmp_path_factory.mktemp("standin")
    return write_standin_weights(out, seed=3, arch="tiny")


def _settings(paths, state_dir, **kw) -> FiloSettings:
    env = production_env(paths, "tiny")
    return FiloSettings(profile="production", clip_model=env["FILO_CLIP_MODEL"], clip_weights=str(paths["clip"]),
                        checkpoint=str(paths["filo"]), grounding_model=str(paths["grounding"]),
                        allow_activation_mismatch=True, device="cpu", image_size=224, allow_open=True,
                        state_dir=state_dir, **kw)


def test_files_are_the_production_formats_and_say_they_are_standins(standins):
    assert {p.name for p in standins.values()} == {CLIP_FILE, FILO_FILE, GROUNDING_DIR}
    for part, path in standins.items():
        record = read_standin_record(path)
        assert record is not None and record["standin"] is True and "NOT inspection results" in record["note"], part
    official = torch.load(standins["filo"], weights_only=True)  # the official layout, loadable safely
    assert set(official) == {"filo", "filo_standin"} and isinstance(official["filo"], dict)
    assert (standins["grounding"] / "config.json").is_file() and (standins["grounding"] / "tokenizer.json").is_file()


def test_same_seed_same_tensors_other_seed_other_tensors(standins, tmp_path):
    again = write_standin_weights(tmp_path / "a", seed=3, parts=("clip",), arch="tiny")
    other = write_standin_weights(tmp_path / "b", seed=4, parts=("clip",), arch="tiny")
    first, second, third = (load_file(p["clip"]) for p in (standins, again, other))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_real_weights_are_never_taken_for_standins(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    assert read_standin_record(plain) is None
    assert read_standin_record(tmp_path / "missing.pth") is None
    assert read_standin_record(tmp_path) is None  # a directory without config.json


def test_the_production_profile_serves_them_and_announces_it(standins, tmp_path, caplog):
    """Through the production loading code (no demo flag anywhere) and the HTTP API: every response says
    `standin: true` and the version is marked; the start-up log carries the banner."""
    settings = _settings(standins, tmp_path, grounding=True)
    with caplog.at_level("WARNING"), ServerThread(create_app(settings, EmbeddedBackend(settings))) as srv:
        wait_ready(srv.url)
        r = httpx.post(f"{srv.url}/v1/inspect", data={"category": "bottle", "heatmap": "none"},
                       files={"image": ("x.png", png_bytes(120, 160), "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    model = r.json()["model"]
    assert model["standin"] is True and model["version"].startswith("standin-")
    assert sum("STAND-IN WEIGHTS" in rec.getMessage() for rec in caplog.records) >= 2  # CLIP/heads, Grounding DINO


def test_real_weights_report_no_standin():
    assert ModelInfoOut(name="FiLo", version="v1").standin is False


def test_engine_info_marks_each_standin_part(standins, tmp_path):
    from service.core.types import InspectRequest, InspectResult
    from service.engine.pipeline import InspectionEngine

    engine = InspectionEngine.from_settings(_settings(standins, tmp_path, grounding=False))
    assert engine.info["standin"] is True and engine.info["profile"] == "production"
    (res,) = engine.inspect_batch([InspectRequest(synthetic_image(100, 120), "bottle")])
    assert isinstance(res, InspectResult)
