"""ipywidgets, IPython and matplotlib's widget use stay inside spadkit.notebook (DESIGN.md: the one exception)."""

from __future__ import annotations

import ast
from pathlib import Path

import spadkit

PACKAGE = Path(spadkit.__file__).parent
FRONT_END = {"ipywidgets", "IPython"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_no_other_spadkit_module_imports_the_notebook_front_end():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(name for name in _imports(path) if name.split(".")[0] in FRONT_END or name.startswith("spadkit.notebook"))
        for path in PACKAGE.rglob("*.py")
        if "notebook" not in path.relative_to(PACKAGE).parts
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert "ipywidgets" in _imports(PACKAGE / "notebook" / "viewer.py")  # the scan sees real imports
