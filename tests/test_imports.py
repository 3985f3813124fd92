"""The house's rules about imports, read from the source (deferred imports inside functions too).

- `models/` is the network and its weights only: it imports nothing else of this repository.
- The service never reaches into the offline lab (`filo_lab/`): the lab builds on the service, not back;
  only the command line (`service/cli/`), everyone's entry point, offers the lab's commands (train, eval, bench).
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
OURS = ("models", "service", "filo_lab", "descriptions")


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


@pytest.mark.parametrize("package", OURS)
def test_every_module_imports(package):
    root = importlib.import_module(package)
    names = [info.name for info in pkgutil.walk_packages(root.__path__, f"{package}.")
             if not info.name.endswith("__main__")]
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
