"""The JupyterLab tutorials: committed without outputs, and each one runs top to bottom (nbmake)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
#: Seconds any one cell may run (the slowest, an ingest, takes ~10 s on 2 busy cores).
CELL_TIMEOUT_S = 180


def test_the_tutorials_are_there():
    assert [p.name for p in NOTEBOOKS][:2] == ["01_load_and_look.ipynb", "02_catalog_and_ingest.ipynb"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(notebook):
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    dirty = [i for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code" and (cell["outputs"] or cell["execution_count"] is not None)]
    assert dirty == [], f"{notebook.name}: cells {dirty} have outputs; clear them (JupyterLab: Edit > Clear Outputs of All Cells) before committing"
    assert "widgets" not in nb["metadata"], f"{notebook.name} holds saved widget state; save it without (Settings > Save Widget State Automatically off)"


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(notebook):
    before = sorted(NOTEBOOK_DIR.rglob("*"))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbmake", f"--nbmake-timeout={CELL_TIMEOUT_S}", "-p", "no:cacheprovider", "-q", str(notebook)],
        capture_output=True,
        text=True,
        cwd=NOTEBOOK_DIR.parent,
    )
    assert result.returncode == 0, f"{notebook.name} failed under nbmake:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert "1 passed" in result.stdout
    assert sorted(NOTEBOOK_DIR.rglob("*")) == before, "the notebook wrote files next to itself; write under a temporary folder"
