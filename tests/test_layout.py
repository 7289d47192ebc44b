"""The code layout's rules (docs/design.md §7), checked on the source itself.

- imports flow one way between the layers (the import-linter contract in pyproject.toml,
  also run by `make lint`), and the contract does catch an upward import;
- no module imports itself through a chain of others (no cycles);
- no function-level `sidpipe` import hides a dependency, except the start-up-time ones
  listed (the CLI's dispatch, the runners a pipeline's launcher never runs).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys

import grimp
import pytest

from tests.conftest import REPO

LINT = [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"]


@pytest.mark.multiprocess
def test_layers_contract_holds():
    r = subprocess.run(LINT, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "1 kept, 0 broken" in r.stdout


@pytest.mark.multiprocess
def test_layers_contract_catches_an_upward_import(tmp_path):
    """The contract can fail: the same check on a copy where a model imports a driver."""
    shutil.copytree(REPO / "sidpipe", tmp_path / "sidpipe")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    mlp = tmp_path / "sidpipe" / "models" / "mlp.py"
    mlp.write_text(mlp.read_text() + "\nfrom sidpipe.drivers import sid  # noqa\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(LINT, capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert r.returncode != 0
    assert "sidpipe.models.mlp -> sidpipe.drivers" in r.stdout.replace("\n", " ")


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    found = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                found.append([module, *chain])
    return found


def test_no_import_cycles():
    graph = grimp.build_graph("sidpipe", exclude_type_checking_imports=True)
    # a package's __init__ importing its own submodules is not a cycle of design
    cycles = [c for c in _cycles(graph) if not any(
        a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]  # fmt: skip
    assert cycles == []


# The lazy imports allowed, all for start-up time, each named: (file, module imported).
LAZY_IMPORTS = {
    # the CLI's command dispatch: `sidpipe export` need not pay for hydra or the drivers
    ("sidpipe/cli.py", "sidpipe.train"),
    ("sidpipe/cli.py", "sidpipe.export"),
    ("sidpipe/cli.py", "sidpipe.inference"),
    ("sidpipe/cli.py", "sidpipe.bench.throughput"),
    ("sidpipe/cli.py", "sidpipe.bench.accuracy"),
    # a pipeline's launcher never runs a stage: the runners (dynamo, and for BP torch
    # pipelining + DTensor) load in the stage processes only
    ("sidpipe/drivers/launch.py", "sidpipe.drivers.bp"),
    ("sidpipe/drivers/launch.py", "sidpipe.drivers.sid"),
    ("sidpipe/drivers/dispatch.py", "sidpipe.drivers.single"),
}


def test_no_function_level_imports_of_sidpipe():
    """A lazy `from sidpipe...` inside a function hides a dependency from a reader (and can
    hide a cycle); only the start-up-time ones in LAZY_IMPORTS are allowed."""
    offenders, seen = [], set()
    for path in sorted((REPO / "sidpipe").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if not isinstance(inner, ast.ImportFrom):
                        continue
                    module = inner.module or ""
                    if not module.startswith("sidpipe"):
                        continue
                    if (rel, module) in LAZY_IMPORTS:
                        seen.add((rel, module))
                    else:
                        offenders.append(f"{rel}:{inner.lineno} imports {module}")
    assert offenders == []
    assert seen == LAZY_IMPORTS  # a stale entry would let a new lazy import through unread


@pytest.mark.multiprocess
def test_a_pipeline_launcher_imports_no_runner():
    """What the lazy imports are for: the launcher process starts the stages sooner."""
    code = ("import sys, sidpipe.train, sidpipe.drivers; "
            "print(sorted(m for m in sys.modules if m.startswith(('sidpipe.drivers.', "
            "'torch._dynamo', 'torch.distributed.pipelining', 'torch.distributed.checkpoint'))"
            " and '.' in m))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    loaded = eval(r.stdout)  # noqa: S307 - our own print of a list of names
    assert loaded == [
        "sidpipe.drivers.balance",
        "sidpipe.drivers.dispatch",
        "sidpipe.drivers.launch",
        "sidpipe.drivers.rundir",
        "sidpipe.drivers.summary",
    ], loaded


def test_no_comment_points_outside_the_repository():
    """Design references go to docs/design.md, which exists: no outside documents or issues."""
    assert (REPO / "docs" / "design.md").is_file()
    bad = []
    for path in sorted([*(REPO / "sidpipe").rglob("*.py"), *(REPO / "tests").rglob("*.py")]):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if ("DESIGN" + ".md") in line or ("DESIGN " + "§") in line or ("issue " + "#") in line:
                bad.append(f"{path.relative_to(REPO)}:{i}")
    assert bad == []
