"""The house's rules about imports, read from the source (deferred imports inside functions too).

- `models/` is the network and its weights only: it imports nothing else of this repository.
- The service never reaches into the offline lab (`filo_lab/`): the lab builds on the service, not back;
  only the command line (`service/cli/`), everyone's entry point, offers the lab's commands (train, eval, bench).
- The lab stands beside the API, below the command line: it builds on what lies below, and never imports a
  command or the API (`LAYERS`).
- The line connector (`filo_line/`) is a client of the HTTP API: it imports nothing else of this repository, and
  nothing imports it but the command line (`filo line`) and the lab's benchmark of it (`filo_lab/bench/line.py`).
- Every module imports, so a deferred import cannot break late (a moved module, a missing name).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = ("models", "service", "filo_lab", "descriptions", "filo_line")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth; relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names]
    return found


def violations(top: str, forbidden: tuple[str, ...], except_under: str | None = None) -> list[str]:
    out = []
    for path in sorted((REPO / top).rglob("*.py")):
        if except_under and (REPO / except_under) in path.parents:
            continue
        for line, module in imported_modules(path):
            if module.split(".")[0] in forbidden:
                out.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return out


def test_models_import_nothing_else_of_the_repository():
    assert violations("models", tuple(p for p in OURS if p != "models")) == []


def test_the_service_never_imports_the_lab():
    assert violations("service", ("filo_lab",), except_under="service/cli") == []


def test_the_line_connector_is_a_client_that_imports_nothing_of_ours():
    assert violations("filo_line", tuple(p for p in OURS if p != "filo_line")) == []


def test_only_the_command_line_and_the_labs_benchmark_import_the_line_connector():
    found = violations("service", ("filo_line",), except_under="service/cli")
    found += violations("models", ("filo_line",)) + violations("descriptions", ("filo_line",))
    found += [v for v in violations("filo_lab", ("filo_line",)) if not v.startswith("filo_lab/bench/line.py:")]
    assert found == []


def test_the_rule_reader_sees_deferred_and_relative_imports(tmp_path, monkeypatch):
    """The check itself can fail: a deferred import inside a function and a relative one are both found."""
    pkg = tmp_path / "models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("def f():\n    from service.engine.pipeline import X\n    from . import sibling\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    found = violations("models", ("service",))
    assert found == ["models/bad.py:2 imports service.engine.pipeline.X"]
    assert ("models.sibling" in [m for _, m in imported_modules(pkg / "bad.py")])


# Alembic's environment script exists only inside an Alembic run (tests/test_records.py runs every migration)
RUN_BY_ALEMBIC = ("service.records.migrations.env",)


@pytest.mark.parametrize("package", OURS)
def test_every_module_imports(package):
    root = importlib.import_module(package)
    names = [info.name for info in pkgutil.walk_packages(root.__path__, f"{package}.")
             if not info.name.endswith("__main__") and info.name not in RUN_BY_ALEMBIC]
    assert names or package == "descriptions"
    for name in names:
        importlib.import_module(name)


def test_every_listed_command_exists_and_a_missing_one_fails_loudly(monkeypatch):
    import service.cli as cli

    parser = cli.build_parser()
    listed = set(parser._subparsers._group_actions[0].choices)  # argparse keeps the commands here
    assert listed == {name.replace("_", "-") for name in cli.COMMAND_MODULES}
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "moved_away"))
    with pytest.raises(ModuleNotFoundError, match="service.cli.moved_away_cmd"):
        cli.build_parser()


def test_every_import_of_our_modules_resolves_deferred_ones_too():
    """A function-level `from models import synth` of a module that moved only fails when that function
    runs; read every import of our packages in the source (tests and scripts too) and resolve it now."""
    unresolved = []
    for top in (*OURS, "tests", "scripts"):
        for path in sorted((REPO / top).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in OURS:
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        if not hasattr(module, alias.name) and importlib.util.find_spec(
                                f"{node.module}.{alias.name}") is None:
                            unresolved.append(f"{path.relative_to(REPO)}:{node.lineno} {node.module}.{alias.name}")
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.split(".")[0] in OURS and importlib.util.find_spec(alias.name) is None:
                            unresolved.append(f"{path.relative_to(REPO)}:{node.lineno} {alias.name}")
    assert unresolved == []


# --- the layers of the service, the lab and the model ---------------------------------------------------------

# highest first; a module may import from its own package and from lower layers only. Packages of one layer
# are siblings and may not import each other; packages joined by "|" form one level (core, the settings and
# the console's static files). The lab is the API's sibling: the command line offers it, and it builds on what
# lies below (today the engine and under it), never on a command or the API (nor they on it).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("service.cli",),
    ("service.api", "filo_lab"),
    ("service.workflows",),
    ("service.backends", "service.worker"),
    ("service.queue", "service.engine"),
    ("service.catalog",),
    ("service.records",),
    ("service.core|service.settings|service.settings_doc|service.console",),
    ("models", "descriptions"),
)


def layer_of(module: str) -> tuple[int, str] | None:
    """(level, package) of a module of ours; None for third-party modules."""
    for level, packages in enumerate(LAYERS):
        for group in packages:
            for package in group.split("|"):
                if module == package or module.startswith(package + "."):
                    return level, group
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def real_module(name: str) -> str:
    """`from a.b import c` names module a.b.c or attribute c of a.b: the longest prefix that is a module."""
    while "." in name:
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except ModuleNotFoundError:  # a parent is a module, not a package
            pass
        name = name.rsplit(".", 1)[0]
    return name


def import_graph(root: Path = REPO) -> dict[str, set[tuple[int, str]]]:
    """module -> {(line, imported module of ours)} over every package of ours (service/, filo_lab/, models/,
    descriptions/)."""
    graph: dict[str, set[tuple[int, str]]] = {}
    for top in OURS:
        for path in sorted((root / top).rglob("*.py")):
            mods = set()
            for line, name in imported_modules(path):
                if layer_of(name) is not None:
                    mods.add((line, real_module(name)))
            graph[module_name(path)] = mods
    return graph


def layering_violations(graph: dict[str, set[tuple[int, str]]]) -> list[str]:
    out = []
    for module, imports in graph.items():
        here = layer_of(module)
        if here is None:
            continue
        for line, name in sorted(imports):
            there = layer_of(name)
            if there is None or there[1] == here[1]:
                continue  # third-party, or its own package
            if there[0] >= here[0] and not (there[0] == here[0] and there[1] == here[1]):
                if there[0] > here[0]:
                    continue  # a lower layer: allowed
                out.append(f"{module}:{line} imports {name} (sibling layer {there[1]})")
            elif there[0] < here[0]:
                out.append(f"{module}:{line} imports {name} (a higher layer: {there[1]})")
    return sorted(out)


def circles(graph: dict[str, set[tuple[int, str]]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan's algorithm)."""
    edges = {m: sorted({n for _, n in imps if n in graph and n != m}) for m, imps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_service_and_the_lab_import_only_downwards_and_in_no_circle():
    graph = import_graph()
    assert {m.split(".")[0] for m in graph} == set(OURS)
    assert layering_violations(graph) == []
    assert circles(graph) == []


def test_the_layering_check_fails_on_a_violation_and_a_circle():
    """The check itself: an engine module importing the API, two catalog modules importing each other; the lab
    importing a command or the API, and the engine importing the lab."""
    graph = {
        "service.engine.pipeline": {(3, "service.api.errors"), (4, "service.catalog.store")},
        "service.worker.loop": {(5, "service.backends.embedded")},
        "service.catalog.store": {(1, "service.catalog.references")},
        "service.catalog.references": {(2, "service.catalog.store"), (9, "service.core.types")},
        "filo_lab.bench.load": {(34, "service.cli.loadtest_cmd"), (35, "filo_lab.bench.stack"),
                                (36, "service.engine.pipeline")},
        "filo_lab.bench.stack": {(7, "service.api.app"), (8, "models.frame"), (9, "descriptions")},
        "service.engine.prepare": {(12, "filo_lab.data")},
    }
    assert layering_violations(graph) == [
        "filo_lab.bench.load:34 imports service.cli.loadtest_cmd (a higher layer: service.cli)",
        "filo_lab.bench.stack:7 imports service.api.app (sibling layer service.api)",
        "service.engine.pipeline:3 imports service.api.errors (a higher layer: service.api)",
        "service.engine.prepare:12 imports filo_lab.data (a higher layer: filo_lab)",
        "service.worker.loop:5 imports service.backends.embedded (sibling layer service.backends)",
    ]
    assert circles(graph) == [["service.catalog.references", "service.catalog.store"]]


def test_the_settings_take_filos_defining_values_from_the_model_without_torch():
    """Defaults are written once: the settings' model defaults are `models.constants` (which the model's own
    modules use too), and importing the settings, as the torch-free API does, imports no torch."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from service.settings import FiloSettings\n"
        "from models import constants as c\n"
        "assert 'torch' not in sys.modules, 'the settings imported torch'\n"
        "s = FiloSettings()\n"
        "assert (s.clip_model, s.clip_weights, s.image_size, s.grounding_model) == (\n"
        "    c.DEFAULT_CLIP_MODEL, c.DEFAULT_CLIP_WEIGHTS, c.DEFAULT_IMAGE_SIZE, c.DEFAULT_GROUNDING_MODEL)\n"
        "assert (s.reference_match, s.reference_radius, s.reference_weight) == (\n"
        "    c.DEFAULT_MATCH, c.DEFAULT_RADIUS, c.DEFAULT_WEIGHT)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILO_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from models import clip_backbone, constants
    from models import references as mr

    assert clip_backbone.BackboneSpec() == clip_backbone.BackboneSpec(
        constants.DEFAULT_CLIP_MODEL, constants.DEFAULT_CLIP_WEIGHTS, constants.DEFAULT_IMAGE_SIZE)
    assert mr.ReferenceMemory([], 1, 1, 1.0).weight == constants.DEFAULT_WEIGHT
