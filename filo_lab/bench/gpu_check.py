"""The GPU check (`scripts/gpu_check.sh`): CUDA tests, model benchmark, the service under load, one report.

A GPU is lent to this project for minutes at a time, so the check is one prepared command that puts the
most important facts first and always leaves a report: each step runs as its own process with a time
limit taken from one overall budget, results are written after every step (`report.md`, `results.json`,
and the logs), and a step that fails or runs out of time is recorded as such while the next one still
runs. `--dry-run` executes every step on the CPU with the tiny test architectures, so that the script
itself is tested where no GPU is.

Order: 1. `pytest -m cuda` (stops at the first failure; its traceback goes into the report);
2. the decisive table (`filo_lab/bench/parts.py`): FiLo alone, Grounding DINO alone and both, bf16, batch
32, for each implementation of Grounding DINO's deformable attention (the project's Triton kernel, the
PyTorch path), on the realistic Grounding DINO stand-in, then the profile of one batch with Grounding DINO
on; 3. `filo bench` over batch sizes, fp32/bf16, Grounding DINO on/off, then each speed option off and on;
4. the service end to end on stand-in weights of the real shapes (production profile): embedded mode, then
queue mode (redis-server, one API, one worker) without and with the GPU image path, 1.5 MP and 5 MP JPEGs at
two concurrencies; 5. the machine (`nvidia-smi`, the device name) heads the report. Every model figure uses
the realistic Grounding DINO stand-in (a handful of boxes per image, as trained weights keep).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Plan:
    """What a check runs; `real` on a GPU, `dry` on the CPU with the tiny architectures."""

    arch: str
    device: str
    batch_sizes: str
    option_batch: int  # the batch size at which each speed option is measured off and on
    iters: int
    warmup: int
    serve_batch: int
    precision: str
    sizes: tuple[str, ...]
    concurrencies: tuple[int, ...]
    load_s: float
    budget_s: float
    precisions: str = "fp32,bf16"
    tests_s: float = 150.0  # the most the CUDA tests may take
    sweep_s: float = 170.0  # the most the benchmark sweep may take
    serving: str = "all"  # "all" configurations, or "gpu-path": the embedded server with the GPU image path only
    test_files: tuple[str, ...] = ("tests/test_cuda.py", "tests/test_gpu_imaging.py")
    table_batch: int = 32  # the decisive table's batch size
    table_s: float = 150.0  # the most the decisive table (and its profile) may take
    table_frame: int | None = None  # Grounding DINO's input there (None: the service's 518)
    implementations: str = "triton,pytorch"  # deformable attention, in the table's order
    compile_grounding: bool = True  # measure FILO_COMPILE_GROUNDING among the speed options


PLANS = {
    "real": Plan("real", "cuda", "1,8,16,32,64", 32, 3, 1, 32, "bf16", ("1.5MP", "5MP"), (16, 64), 6.0, 540.0),
    # what fits a lease's last three minutes: the decisive table, bf16 only, a few batch sizes, the GPU image
    # path end to end
    "short": Plan("real", "cuda", "1,16,32", 32, 2, 1, 32, "bf16", ("1.5MP",), (64,), 8.0, 200.0,
                  precisions="bf16", tests_s=45.0, sweep_s=40.0, serving="gpu-path", table_s=80.0,
                  compile_grounding=False),
    # the CPU: the tiny models, the Triton kernel through Triton's interpreter on a smaller detector input;
    # Grounding DINO compiled with inductor takes minutes on a CPU (tests/test_grounding_compile.py covers it)
    "dry": Plan("tiny", "cpu", "1,2", 2, 1, 1, 4, "fp32", ("1.5MP",), (2,), 3.0, 900.0, table_batch=2,
                table_s=240.0, table_frame=240, compile_grounding=False),
}


@dataclass
class Check:
    """The report being built; written out after every step."""

    out: Path
    plan: Plan
    started: float = field(default_factory=time.monotonic)
    sections: list[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)

    def left_s(self) -> float:
        return self.plan.budget_s - (time.monotonic() - self.started)

    def add(self, key: str, markdown: str, data: object) -> None:
        self.sections.append(markdown)
        self.results[key] = data
        self.write()

    def write(self) -> None:
        elapsed = time.monotonic() - self.started
        head = f"# FiLo Inspect GPU check ({'dry run on CPU' if self.plan.device == 'cpu' else 'real'})\n\n" \
               f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {elapsed:.0f} s so far\n"
        (self.out / "report.md").write_text(head + "\n" + "\n\n".join(self.sections) + "\n")
        (self.out / "results.json").write_text(json.dumps({"plan": asdict(self.plan), **self.results}, indent=1))


def run(cmd: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, float]:
    """Run `cmd` from the repository root, appending its output to `log`; (exit code, seconds); 124 on timeout."""
    t0 = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=max(1.0, timeout_s),
                                  env=env)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = 124
            f.write(f"\n[gpu_check: stopped after {timeout_s:.0f} s]\n".encode())
    return code, time.monotonic() - t0


def filo(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


# --- 5. the machine ---------------------------------------------------------------------------------------


def step_machine(check: Check) -> None:
    smi = shutil.which("nvidia-smi")
    smi_text = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout if smi else "(no nvidia-smi)"
    probe = ("import json, torch, transformers, open_clip, numpy; print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() "
             "else 'cpu', 'transformers': transformers.__version__, 'open_clip': open_clip.__version__, "
             "'numpy': numpy.__version__, 'python': __import__('sys').version.split()[0], "
             "'cpus': __import__('os').cpu_count()}))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    info = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    info["commit"] = commit.stdout.strip() or "unknown"
    lines = [f"- {k}: {v}" for k, v in info.items()]
    check.add("machine", "## Machine\n\n" + "\n".join(lines) + f"\n\n```\n{smi_text.strip()}\n```", info)


# --- 1. CUDA tests ----------------------------------------------------------------------------------------


def step_tests(check: Check) -> None:
    log = check.out / "pytest-cuda.log"
    files = [f for f in check.plan.test_files if (REPO / f).exists()]
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-x", "-q", "-rs", "-p", "no:cacheprovider", *files]
    code, secs = run(cmd, log, min(check.plan.tests_s, check.left_s() - 20))
    text = log.read_text(errors="replace")
    summary = next((ln for ln in reversed(text.splitlines()) if " passed" in ln or " failed" in ln
                    or " skipped" in ln or "error" in ln.lower()), "(no summary line)")
    md = f"## 1. CUDA tests (`pytest -m cuda -x`)\n\nexit {code} in {secs:.0f} s: `{summary.strip()}`"
    if code not in (0, 5):
        start = text.find("= FAILURES =")
        start = text.rfind("\n", 0, start) if start >= 0 else max(0, len(text) - 6000)
        md += "\n\nFirst failure:\n\n```\n" + text[start:start + 6000].strip() + "\n```"
    check.add("tests", md, {"exit": code, "seconds": round(secs, 1), "summary": summary.strip()})


# --- 2. the decisive table ---------------------------------------------------------------------------------


def step_table(check: Check) -> None:
    from filo_lab.bench.parts import table_md

    p = check.plan
    tmp = Path(tempfile.mkdtemp(prefix="filo-parts-"))
    js = tmp / "parts.json"
    cmd = [sys.executable, "-m", "filo_lab.bench.parts", "--arch", p.arch, "--device", p.device, "--batch",
           str(p.table_batch), "--precision", p.precision, "--implementations", p.implementations, "--iters",
           str(p.iters), "--warmup", str(p.warmup), "--grounding-weights", "realistic", "--profile", "--json", str(js)]
    if p.table_frame:
        cmd += ["--frame", str(p.table_frame)]
    # on the CPU the Triton kernel runs through Triton's interpreter (its CUDA build is what the real plan times)
    env = {**os.environ, "TRITON_INTERPRET": "1"} if p.device == "cpu" else None
    code, secs = run(cmd, check.out / "table.log", min(p.table_s, check.left_s() - 30), env=env)
    data = json.loads(js.read_text()) if js.exists() else {"rows": []}
    shutil.rmtree(tmp, ignore_errors=True)
    md = (f"## 2. The decisive table ({p.precision}, batch {p.table_batch}, realistic Grounding DINO stand-in)\n\n"
          f"exit {code} in {secs:.0f} s\n\n" + table_md(data["rows"]))
    prof = data.get("profile")
    if prof:
        busy = prof.get("device_busy_ms")
        md += (f"\n\nOne batch of {prof['batch_size']} ({prof['precision']}, Grounding DINO on, deformable attention "
               f"{prof['runtime']['deformable_attention']}): {prof['wall_ms']:.1f} ms wall"
               + ("" if busy is None else f", device kernels {busy:.1f} ms ({busy / prof['wall_ms']:.0%})")
               + "\n\n| operator | calls | self ms |\n|---|---:|---:|\n"
               + "\n".join(f"| {op['name'][:90]} | {op['calls']} | {op['self_ms']:.2f} |" for op in prof["top"]))
    check.add("table", md, {"exit": code, "seconds": round(secs, 1), **data})


# --- 3. model benchmark -----------------------------------------------------------------------------------


def _bench(check: Check, name: str, extra: list[str], timeout_s: float) -> dict:
    """One `filo bench` run; returns its JSON (whatever rows it measured before a time limit) and exit code."""
    p = check.plan
    tmp = Path(tempfile.mkdtemp(prefix="filo-bench-"))
    js = tmp / f"{name}.json"
    cmd = filo("bench", "--arch", p.arch, "--device", p.device, "--iters", str(p.iters), "--warmup", str(p.warmup),
               "--json", str(js), *extra)
    code, secs = run(cmd, check.out / "bench.log", min(timeout_s, check.left_s() - 30))
    data = json.loads(js.read_text()) if js.exists() else {"rows": []}
    shutil.rmtree(tmp, ignore_errors=True)
    return {"name": name, "exit": code, "seconds": round(secs, 1), **data}


def _rows_md(runs: list[dict]) -> str:
    lines = ["| run | precision | grounding | batch | images/s | ms/batch | peak GiB | compiled | pinned | "
             "deformable attention | grounding compiled |", "|---|---|---|---:|---:|---:|---:|---|---|---|---|"]
    for r in runs:
        for row in r["rows"]:
            peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
            lines.append(f"| {r['name']} | {row['precision']} | {'on' if row['grounding'] else 'off'} | "
                         f"{row['batch_size']} | {row['images_per_s']:.1f} | {row['ms_per_batch']:.1f} | {peak} | "
                         f"{'yes' if row['compiled'] else 'no'} | {'yes' if row['pinned'] else 'no'} | "
                         f"{row.get('deformable_attention', '-')} | {'yes' if row.get('grounding_compiled') else 'no'} |")
    return "\n".join(lines)


def step_bench(check: Check) -> None:
    p = check.plan
    ob = str(p.option_batch)
    runs = [_bench(check, "sweep", ["--batch-sizes", p.batch_sizes, "--precisions", p.precisions, "--grounding",
                                    "both"], min(p.sweep_s, check.left_s() - 30))]
    # each option against the sweep's row of the same batch, precision and grounding setting
    options = [("no-pinned-copies", ["--no-pin-memory"], "off", 60.0), ("compiled-encoder", ["--compile"], "off", 100.0),
               ("cuda-graphs", ["--cuda-graphs"], "off", 150.0),
               ("grounding-text-cache", ["--grounding-text-cache"], "on", 80.0),
               ("compiled-grounding", ["--compile-grounding"], "on", 200.0)]
    for name, flags, grounding, limit in options:
        if name == "compiled-grounding" and not p.compile_grounding:
            runs.append({"name": name, "exit": None, "rows": [], "skipped": "not in this plan"})
            continue
        if check.left_s() < 200 + limit:
            runs.append({"name": name, "exit": None, "rows": [], "skipped": "out of time"})
            continue
        runs.append(_bench(check, name, ["--batch-sizes", ob, "--precisions", "bf16", "--grounding", grounding,
                                         *flags], limit))
    md = "## 3. Model benchmark (`filo bench`, random weights, realistic Grounding DINO stand-in)\n\n" + _rows_md(runs)
    for r in runs:
        state = r.get("skipped") or f"exit {r['exit']} in {r.get('seconds', 0)} s"
        md += f"\n- {r['name']}: {state}"
        if "bf16_map_deviation" in r:
            md += f"; largest |map(bf16) - map(fp32)| = {r['bf16_map_deviation']:.2e}"
    check.add("bench", md, runs)


# --- 4. the service end to end ----------------------------------------------------------------------------


def step_serving(check: Check) -> None:
    from filo_lab.bench.load import measure, start_stack, test_images

    p = check.plan
    weights = Path(tempfile.mkdtemp(prefix="filo-standin-"))
    log = check.out / "serving.log"
    code, secs = run(filo("standin", str(weights), "--arch", p.arch, "--grounding", "realistic"), log, min(180.0, check.left_s() - 60))
    results: list[dict] = []
    md = f"## 4. The service end to end (stand-in weights, production profile, {p.precision})\n\n" \
         f"stand-in weights written: exit {code} in {secs:.0f} s\n"
    if code == 0:
        from filo_lab.standin import CLIP_FILE, FILO_FILE, GROUNDING_DIR, production_env

        paths = {"clip": weights / CLIP_FILE, "filo": weights / FILO_FILE, "grounding": weights / GROUNDING_DIR}
        model_env = {**production_env(paths, p.arch), "FILO_DEVICE": p.device, "FILO_PRECISION": p.precision,
                     "FILO_MAX_BATCH_SIZE": str(p.serve_batch)}
        images = test_images(list(p.sizes))
        gpu_path = {"FILO_GPU_IMAGE_PATH": "true"}
        most = p.concurrencies[-1:]
        # the most telling first: embedded (the HTTP target), then the GPU image path, the CPU path last
        configs = [("embedded", {}, p.concurrencies), ("embedded", gpu_path, most), ("queue", gpu_path, most),
                   ("queue", {}, most)]
        if p.serving == "gpu-path":
            configs = [("embedded", gpu_path, most)]
        for mode, extra, concurrencies in configs:
            label = mode + (" + GPU image path" if extra else "")
            if check.left_s() < 45 + len(images) * len(concurrencies) * (p.load_s + 3):
                results.append({"config": label, "skipped": "out of time"})
                continue
            logs = Path(tempfile.mkdtemp(prefix="filo-serving-logs-"))
            try:
                with start_stack(mode, {**model_env, **extra}, logs, ready_timeout_s=min(300.0, check.left_s())) as st:
                    for size, data in images.items():
                        for conc in concurrencies:
                            row = measure(st, data, "pcb1", conc, p.load_s)
                            results.append({"config": label, "size": size, **row})
                            check.results["serving"] = results
                            check.write()
            except Exception as exc:  # recorded; the next configuration still runs
                results.append({"config": label, "error": f"{type(exc).__name__}: {exc}"[:3000]})
            finally:
                with open(log, "a") as f:
                    for lf in sorted(logs.glob("*.log")):
                        f.write(f"\n===== {label}: {lf.name} (last 200 lines) =====\n")
                        f.write("\n".join(lf.read_text(errors="replace").splitlines()[-200:]) + "\n")
                shutil.rmtree(logs, ignore_errors=True)
    shutil.rmtree(weights, ignore_errors=True)
    md += _serving_md(results)
    check.add("serving", md, results)


def _serving_md(results: list[dict]) -> str:
    lines = ["| config | image | clients | images/s | p50 ms | p99 ms | ok / sent | API CPU ms/img | "
             "worker CPU ms/img | worker non-model ms/img |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    notes = []
    for r in results:
        if "skipped" in r or "error" in r:
            notes.append(f"- {r['config']}: {r.get('skipped') or r.get('error')}")
            continue
        cpu = r["cpu_ms_per_image"]
        stages = r.get("worker_stage_cpu_ms_per_image")
        nonmodel = "-" if not stages else f"{sum(stages.values()):.1f}"
        worker = cpu.get("worker", cpu.get("api"))  # embedded: one process does both
        lines.append(f"| {r['config']} | {r['size']} ({r['image_kb']:.0f} KB) | {r['concurrency']} | "
                     f"{r['images_per_s']:.1f} | {r['latency_ms']['p50']:.0f} | {r['latency_ms']['p99']:.0f} | "
                     f"{r['ok']} / {r['sent']} | {cpu['api']:.1f} | {worker:.1f} | {nonmodel} |")
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


STEPS = {"machine": step_machine, "tests": step_tests, "table": step_table, "bench": step_bench,
         "serving": step_serving}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every step on the CPU with the tiny architectures")
    ap.add_argument("--short", action="store_true", help="the three-minute plan (bf16, few sizes, one serving case)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "out" / "gpu"))
    ap.add_argument("--steps", default="tests,table,bench,serving,machine", help="which steps, in this order")
    ap.add_argument("--budget-s", type=float, help="overall time budget (default: the plan's)")
    args = ap.parse_args(argv)
    plan = PLANS["dry" if args.dry_run else "short" if args.short else "real"]
    if args.budget_s:
        plan = replace(plan, budget_s=args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, plan)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"gpu_check: unknown steps {unknown}; known: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    failed = False
    for name in steps:
        print(f"[gpu_check] {name} ({check.left_s():.0f} s of budget left)", flush=True)
        try:
            STEPS[name](check)
        except Exception as exc:  # the report says so; later steps still run
            failed = True
            check.add(name, f"## {name}: the step itself failed\n\n```\n{type(exc).__name__}: {exc}\n```",
                      {"error": f"{type(exc).__name__}: {exc}"})
    # the machine section heads the report although it is measured last (it costs nothing worth the wait)
    machine = [s for s in check.sections if s.startswith("## Machine")]
    check.sections = machine + [s for s in check.sections if not s.startswith("## Machine")]
    check.write()
    print((out / "report.md").read_text())
    tests = check.results.get("tests", {})
    return 1 if failed or tests.get("exit") not in (None, 0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
