"""What importing each room loads: the models stay torch + numpy, tasks and data stay light until used."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import spadkit

DATA_STACK = {"zarr", "dask", "ome_zarr", "pydicom", "nibabel", "nrrd", "tifffile"}
PROBE = """
import json, sys
def top(): return {m.split(".")[0] for m in sys.modules}
import {before}
before = top()
import {module}
print(json.dumps(sorted(top() - before)))
"""


def _added(module: str, before: str = "sys") -> set[str]:
    """Top-level packages ``import module`` adds to ``sys.modules`` after ``import before``, in a fresh interpreter."""
    code = PROBE.replace("{before}", before).replace("{module}", module)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_models_import_torch_numpy_and_stdlib_only():
    added = _added("spadkit.models", before="torch, numpy")  # what torch itself loads is not spadkit's choice
    assert added - set(sys.stdlib_module_names) == {"spadkit"}


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("spadkit.tasks, spadkit.data", DATA_STACK | {"lightning", "torch", "PIL", "yaml", "pydantic"}),
        ("spadkit.tasks.pretrain, spadkit.tasks.tokenizer", DATA_STACK),  # Lightning, not the streaming stack
    ],
)
def test_import_loads_no_heavy_stack(module, forbidden):
    assert _added(module) & forbidden == set()


def test_lazy_names_resolve_and_are_listed():
    import spadkit.data
    import spadkit.tasks

    assert spadkit.tasks.MIMPretrain.__module__ == "spadkit.tasks.pretrain"
    assert spadkit.data.PatchStream.__module__ == "spadkit.data.stream"
    assert spadkit.Volume.__module__ == "spadkit.volume"
    assert {"PatchDataModule", "PatchStream"} <= set(dir(spadkit.data))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        spadkit.data.Nope  # noqa: B018


def test_demo_does_not_import_the_cli():
    tree = ast.parse((Path(spadkit.__file__).parent / "demo.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "spadkit.cli" not in imported and "spadkit.tasks.launch" in imported
