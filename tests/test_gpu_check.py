"""`scripts/gpu_check.sh --dry-run`: every step of the GPU check runs here, on the CPU with the tiny
architectures, so that on a lent GPU the script itself cannot be what fails."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.redis
def test_dry_run_executes_every_step_and_reports(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILO_")}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["plan"]["arch"] == "tiny" and results["machine"]["cpus"] >= 1
    assert results["tests"]["exit"] == 0 and "skipped" in results["tests"]["summary"]  # no GPU: skipped, said so
    # the decisive table: FiLo alone, then Grounding DINO alone and both for each deformable attention (the
    # kernel through Triton's interpreter here), the realistic stand-in's handful of boxes, and the profile
    table = results["table"]
    assert table["exit"] == 0 and table["grounding_weights"] == "realistic"
    assert [(r["part"], r["deformable_attention"]) for r in table["rows"]] == [
        ("FiLo alone", "-"), ("Grounding DINO alone", "triton"), ("FiLo + Grounding DINO", "triton"),
        ("Grounding DINO alone", "pytorch"), ("FiLo + Grounding DINO", "pytorch")]
    assert all(r["error"] is None and r["images_per_s"] > 0 and r["batch_size"] == 2 for r in table["rows"])
    assert [r["boxes_per_image"] for r in table["rows"] if r["part"] == "Grounding DINO alone"] == [4.0, 4.0]
    assert table["profile"]["top"] and table["profile"]["runtime"]["deformable_attention"] == "triton"
    runs = {r["name"]: r for r in results["bench"]}
    assert set(runs) == {"sweep", "no-pinned-copies", "compiled-encoder", "cuda-graphs",
                         "grounding-text-cache", "compiled-grounding"}
    assert runs["compiled-grounding"]["skipped"] == "not in this plan"  # inductor on a CPU: minutes
    measured = {name: r for name, r in runs.items() if name != "compiled-grounding"}
    assert all(r["exit"] == 0 and r["rows"] for r in measured.values())
    assert len(runs["sweep"]["rows"]) == 8  # 2 sizes x 2 precisions x grounding off/on
    assert runs["compiled-encoder"]["rows"][0]["compiled"] and not runs["no-pinned-copies"]["rows"][0]["pinned"]
    assert runs["cuda-graphs"]["rows"][0]["compiled"] and runs["grounding-text-cache"]["rows"][0]["text_cache"]
    assert {row["deformable_attention"] for row in runs["sweep"]["rows"]} == {"off", "pytorch"}
    assert {row["grounding_weights"] for row in runs["sweep"]["rows"] if row["grounding"]} == {"realistic"}
    serving = results["serving"]
    assert [r["config"] for r in serving] == ["embedded", "embedded + GPU image path", "queue + GPU image path",
                                              "queue"]
    for row in serving:
        assert row["ok"] > 0 and row["lost"] == 0 and row["errors"] == {}, row
        assert row["cpu_ms_per_image"]["api"] > 0
    assert "worker" in serving[-1]["cpu_ms_per_image"] and serving[-1]["worker_stage_cpu_ms_per_image"]
    report = (tmp_path / "report.md").read_text()
    assert report.index("## Machine") < report.index("## 1. CUDA tests") < report.index("## 2. The decisive table") \
        < report.index("## 3.") < report.index("## 4.")
    assert {p.name for p in tmp_path.iterdir()} == {"report.md", "results.json", "pytest-cuda.log", "table.log",
                                                    "bench.log", "serving.log"}


def _bash_array(script: str, name: str) -> set[str]:
    body = re.search(rf"^{name}=\((.*?)\)", script, re.S | re.M)
    assert body, f"{name}=( ... ) not found"
    words = re.sub(r"#.*", "", body.group(1)).split()
    return {_norm(w.split("==")[0]) for w in words}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_runtime_dependency_reaches_the_gpu_machine():
    """The GPU image lacks some of what the service imports (the records database came after the first GPU
    run): each runtime need of the base install and the `model` and `service` extras is in the image,
    carried as a wheel by scripts/gpu_prepare.sh, or named there as not used by the check."""
    script = (REPO / "scripts" / "gpu_prepare.sh").read_text()
    known = _bash_array(script, "WHEELS") | _bash_array(script, "IMAGE_HAS") | _bash_array(script, "NOT_CARRIED")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needs = project["dependencies"] + project["optional-dependencies"]["model"] + \
        project["optional-dependencies"]["service"]
    names = {_norm(re.match(r"[A-Za-z0-9_.-]+", req).group(0)) for req in needs}
    assert names - known == set(), "add them to WHEELS (pinned as in .venv) or IMAGE_HAS in scripts/gpu_prepare.sh"
    assert {"sqlalchemy", "alembic", "mako"} <= _bash_array(script, "WHEELS")
