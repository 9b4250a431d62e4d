"""The scripts run by hand on a GPU machine (benchmarks/, tests/**/gpu_*.py) are not collected by
pytest, so nothing else notices when a name they import from the project is renamed or removed:
every project import they make must resolve."""

from __future__ import annotations

import ast
import glob
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_PACKAGES = ("titan_llava", "benchmarks", "tests")
SCRIPTS = sorted(
    os.path.relpath(p, ROOT)
    for pattern in ("benchmarks/*.py", "tests/**/gpu_*.py")
    for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
)


def project_imports(path: str) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) for every import of a project module in `path`."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in PROJECT_PACKAGES:
                found += [(node.module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [
                (a.name, None, node.lineno)
                for a in node.names
                if a.name.split(".")[0] in PROJECT_PACKAGES
            ]
    return found


def test_the_hand_run_scripts_are_found():
    assert "tests/distributed/gpu_smoke.py" in SCRIPTS
    assert "tests/models/gpu_check.py" in SCRIPTS
    assert "benchmarks/train_throughput.py" in SCRIPTS


@pytest.mark.parametrize("path", SCRIPTS)
def test_project_imports_resolve(path):
    missing = []
    for module, name, line in project_imports(path):
        mod = importlib.import_module(module)
        if name is not None and name != "*" and not hasattr(mod, name):
            try:  # `from package import submodule`
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{path}:{line}: {module}.{name}")
    assert not missing, "names the script imports no longer exist:\n" + "\n".join(missing)
