"""No silent fallbacks: what an engine runs (service/engine/runtime.py, `InspectionEngine.runtime`) is in the
start report, /readyz and `filo_engine_info`, and a production engine on CUDA refuses Grounding DINO's PyTorch
deformable attention unless allowed. The CUDA half of the rule is checked with device strings here (no GPU);
which kernel a model's layers take for which device: tests/test_deformable_attention.py."""

from __future__ import annotations

import httpx
import pytest

from service.api.app import create_app
from service.backends.embedded import EmbeddedBackend
from service.engine.pipeline import InspectionEngine
from service.engine.runtime import SlowPathRefusedError, check_runtime, describe
from tests.service_fixtures import ServerThread, demo_settings, wait_ready


def _runtime(device: str = "cuda:0", attention: str = "pytorch") -> dict:
    return {"device": device, "precision": "bf16", "encoder": "eager", "cuda_graphs": "off", "grounding": "eager",
            "deformable_attention": attention, "warnings": []}


def test_production_on_cuda_refuses_the_pytorch_deformable_attention():
    with pytest.raises(SlowPathRefusedError, match="FILO_ALLOW_PYTORCH_DEFORMABLE_ATTENTION"):
        check_runtime(_runtime("cuda:0", "pytorch"), "production", False)
    with pytest.raises(SlowPathRefusedError):  # a layer mix that includes the slow path is no better
        check_runtime(_runtime("cuda", "mixed: pytorch+triton"), "production", False)


@pytest.mark.parametrize(("device", "attention", "profile", "allowed", "warns"), [
    ("cuda", "pytorch", "production", True, True),  # allowed: starts, and says so
    ("cuda", "pytorch", "demo", False, True),  # demo never refuses, but warns
    ("cuda", "triton", "production", False, False),
    ("cuda", "hub", "production", False, False),
    ("cuda", "off", "production", False, False),  # no Grounding DINO: nothing to refuse
    ("cuda", "none", "production", False, False),  # a detector without such layers
    ("cpu", "pytorch", "production", False, False),  # the CPU's own path
])
def test_what_starts_and_what_warns(device, attention, profile, allowed, warns):
    warnings = check_runtime(_runtime(device, attention), profile, allowed)
    assert bool(warnings) == warns
    if warns:
        assert "pytorch" in warnings[0] and device in warnings[0]


def test_the_start_line_names_every_part():
    line = describe({**_runtime("cuda", "pytorch"), "warnings": ["slow"]})
    assert line == ("device cuda, precision bf16, encoder eager, cuda_graphs off, grounding eager, "
                    "deformable_attention pytorch; WARNING: slow")


@pytest.fixture(scope="module")
def demo_engine():
    return InspectionEngine.from_settings(demo_settings(grounding=True, device="cpu"))


def test_the_engine_reports_what_its_parts_run(demo_engine):
    assert demo_engine.runtime() == {"device": "cpu", "precision": "fp32", "encoder": "eager", "cuda_graphs": "off",
                                     "grounding": "eager", "deformable_attention": "pytorch", "warnings": []}
    other = demo_engine.with_options(precision="bf16", compile=True, cuda_graphs=True, compile_grounding=True)
    assert other.runtime() == {"device": "cpu", "precision": "bf16", "encoder": "compiled",
                               "cuda_graphs": "off (needs CUDA)", "grounding": "compiled",
                               "deformable_attention": "pytorch", "warnings": []}
    # a compiled view over the same model: the first engine's detector stays eager, and so do engines made from
    # the compiled one without the option
    assert other.detector.model is demo_engine.detector.model and not demo_engine.detector.compiled
    assert other.with_options(compile_grounding=False).runtime()["grounding"] == "eager"
    off = InspectionEngine(demo_engine.model, demo_engine.info, demo_engine.catalog, "cpu")
    assert (off.runtime()["grounding"], off.runtime()["deformable_attention"]) == ("off", "off")


def test_the_report_reads_the_layers_not_the_settings(demo_engine, monkeypatch):
    """Layers that run something other than what was asked (here: marked as Hub-kernelled after the
    engine was built) are reported as they are."""
    from models.grounding import deformable_attention as msda

    layers = msda.deformable_layers(demo_engine.detector.model)
    for layer in layers:
        monkeypatch.setitem(layer.__dict__, "forward", type(layer).forward.__get__(layer))
        monkeypatch.setitem(layer.__dict__, "_kernel_repo", "kernels-community/deformable-detr")
    assert demo_engine.runtime()["deformable_attention"] == "hub"


def test_from_settings_applies_the_rule_to_what_it_built(monkeypatch):
    """`from_settings` checks the engine's own report with the profile and the allowance from the settings,
    and keeps the warnings in the report."""
    from service.engine import pipeline

    seen = []

    def fake_check(runtime, profile, allowed):
        seen.append((runtime["deformable_attention"], profile, allowed))
        return ["a warning the rule gave"]

    monkeypatch.setattr(pipeline, "check_runtime", fake_check)
    engine = InspectionEngine.from_settings(demo_settings(allow_pytorch_deformable_attention=True))
    assert seen == [("off", "demo", True)]
    assert engine.runtime()["warnings"] == ["a warning the rule gave"]


def test_readyz_and_the_metric_show_the_runtime(tmp_path):
    """The embedded server's /readyz carries the start report's runtime, and /metrics `filo_engine_info`."""
    settings = demo_settings(state_dir=tmp_path)
    backend = EmbeddedBackend(settings)
    with ServerThread(create_app(settings, backend)) as server:
        body = wait_ready(server.url)
        assert body["detail"]["runtime"] == {"device": "cpu", "precision": "fp32", "encoder": "eager",
                                             "cuda_graphs": "off", "grounding": "off", "deformable_attention": "off",
                                             "warnings": []}
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    line = next(ln for ln in metrics.splitlines() if ln.startswith("filo_engine_info{"))
    for label in ('device="cpu"', 'precision="fp32"', 'encoder="eager"', 'cuda_graphs="off"', 'grounding="off"',
                  'deformable_attention="off"', 'warnings="0"'):
        assert label in line, line
    assert line.endswith(" 1.0")


def test_a_worker_readyz_shows_the_runtime_and_its_warnings():
    """Queue mode: each worker's own /readyz carries its start report, runtime and warnings included."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from service.core.telemetry import Metrics
    from service.engine.lifecycle import StartReport
    from service.worker.health import health_app

    runtime = {**_runtime("cuda:0", "pytorch"), "warnings": ["the PyTorch path, allowed"]}
    worker = SimpleNamespace(name="w1", engine=object(), fatal=None, redis_ok=True, batches=0,
                             report=StartReport("built", 0, 3, 1, 0.5, runtime),
                             catalog=SimpleNamespace(republished=0), metrics=Metrics(), redis=None, keys=None)
    body = TestClient(health_app(worker)).get("/readyz").json()
    assert body["ready"] and body["detail"]["runtime"] == runtime


def test_the_info_metric_carries_one_set_of_labels():
    from service.core.telemetry import Metrics

    metrics = Metrics()
    metrics.set_engine_info(_runtime("cuda:0", "triton"))
    metrics.set_engine_info({**_runtime("cuda:0", "pytorch"), "warnings": ["slow"]})  # a restarted engine
    lines = [ln for ln in metrics.render()[0].decode().splitlines() if ln.startswith("filo_engine_info{")]
    assert len(lines) == 1 and 'deformable_attention="pytorch"' in lines[0] and 'warnings="1"' in lines[0]
