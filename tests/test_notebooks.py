"""The JupyterLab tutorials: committed without outputs, and each one runs top to bottom (nbmake).

Notebooks 05 and 06 share a tutorial folder (``SPADKIT_TUTORIAL_DIR``, a temporary one per test session):
06 resumes the annotation session 05 saved there, as a reader running them in order would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
#: Seconds any one cell may run (the slowest, notebook 04's fine-tunes, ~40 s on 2 idle cores; minutes under load).
CELL_TIMEOUT_S = 400
#: The nbmake run loads no other pytest plugin (napari's, npe2's, zarr's, qt's, ...: seconds of imports per notebook).
NBMAKE_ONLY = [f"-pno:{name}" for name in ("cacheprovider", "napari", "napari-plugin-engine", "npe2", "pytest-qt", "zarr", "jaxtyping", "anyio", "platformdirs")]
TUTORIALS = [
    "01_load_and_look.ipynb",
    "02_catalog_and_ingest.ipynb",
    "03_pretrain.ipynb",
    "04_finetune_and_predict.ipynb",
    "05_active_learning.ipynb",
    "06_napari_continue.ipynb",
]


@pytest.fixture(scope="module")
def tutorial_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tutorial")


def test_the_tutorials_are_there():
    assert [p.name for p in NOTEBOOKS] == TUTORIALS


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(notebook):
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    dirty = [i for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code" and (cell["outputs"] or cell["execution_count"] is not None)]
    assert dirty == [], f"{notebook.name}: cells {dirty} have outputs; clear them (JupyterLab: Edit > Clear Outputs of All Cells) before committing"
    assert "widgets" not in nb["metadata"], f"{notebook.name} holds saved widget state; save it without (Settings > Save Widget State Automatically off)"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(notebook, tutorial_dir, record_property):
    before = sorted(NOTEBOOK_DIR.rglob("*"))
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbmake", f"--nbmake-timeout={CELL_TIMEOUT_S}", *NBMAKE_ONLY, "-q", str(notebook)],
        capture_output=True,
        text=True,
        cwd=NOTEBOOK_DIR.parent,
        env=dict(os.environ, SPADKIT_TUTORIAL_DIR=str(tutorial_dir)),
    )
    record_property("seconds", round(time.perf_counter() - start, 1))
    assert result.returncode == 0, f"{notebook.name} failed under nbmake:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert "1 passed" in result.stdout
    assert sorted(NOTEBOOK_DIR.rglob("*")) == before, "the notebook wrote files next to itself; write under a temporary folder"


@pytest.mark.slow
def test_notebook_06_resumed_the_session_of_05(tutorial_dir):
    """After both ran: 06 found 05's label map and added napari's correction (a display is present under xvfb)."""
    from spadkit.active.history import decode
    from spadkit.io import OMEZarrStore
    from spadkit.notebook.tutorial import CASE

    if not (tutorial_dir / "label_name.txt").is_file():
        pytest.skip("runs after the notebook tests of this module (05 and 06)")
    name = (tutorial_dir / "label_name.txt").read_text()
    versions = OMEZarrStore(str(tutorial_dir / "mni152.zarr")).label_versions(CASE, name)
    ops, authors = [decode(v["message"])["op"] for v in versions], [v["author"] for v in versions]
    assert ops[:8] == ["correction"] * 6 + ["undo", "redo"] and authors[:8] == ["notebook-05"] * 8  # notebook 05
    if os.environ.get("DISPLAY"):  # 06 learned one more slice through napari's dock widget
        assert len(versions) == 9 and ops[-1] == "correction" and authors[-1] != "notebook-05", (ops, authors)
