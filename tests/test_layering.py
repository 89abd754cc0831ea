"""Imports flow one way: orchestration → trainer → projectors (see STYLE.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "projectors": {"trainer", "orchestration", "ray", "optuna", "mlflow", "accelerate", "datasets"},
    "trainer": {"orchestration", "ray", "optuna", "mlflow"},
}
# At run time transformers itself may load accelerate; the layer rule is about what we import.
NEVER_LOADED = {
    "projectors": {"trainer", "orchestration", "ray", "optuna", "mlflow"},
    "trainer": {"orchestration", "ray", "optuna", "mlflow"},
}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports_in_source(package: str) -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {sorted(bad)}"
        for path in sorted((ROOT / package).rglob("*.py"))
        if (bad := _imported_roots(path) & FORBIDDEN[package])
    ]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("package", sorted(NEVER_LOADED))
def test_importing_a_layer_loads_no_higher_layer(package: str) -> None:
    # Catches upward imports hidden behind a third module, which the AST check cannot see.
    code = (
        f"import sys, importlib, pkgutil, {package}\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)\n"
        "loaded = {k.split('.')[0] for k in sys.modules}\n"
        f"print(sorted(loaded & set({sorted(NEVER_LOADED[package])!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
