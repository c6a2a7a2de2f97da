"""``spadkit session``: one loop step per call on the MNI152 store, resumed from the store every time."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spadkit.active import AnnotationSession
from spadkit.cli import main
from tests.mni_session import CASE, tiny_model


def run(capsys, *argv: str) -> tuple[int, object, str]:
    code = main(["session", *argv])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else None, captured.err


def test_a_session_runs_step_by_step_from_the_shell(mni_store, truth, label_name, tmp_path, capsys):
    url = str(mni_store[0])
    code, hint, _ = run(capsys, url, CASE, "suggest", "--label", label_name, "--model", "spad_vit_test")
    assert code == 0 and hint["axis"] in "zyx" and "cold start" in hint["reason"]
    axis = "zyx".index(hint["axis"])
    np.save(tmp_path / "slice.npy", np.take(truth, hint["index"], axis=axis).astype(bool))
    code, done, _ = run(capsys, url, CASE, "submit", "--label", label_name, "--axis", hint["axis"], "--index", str(hint["index"]), "--mask", str(tmp_path / "slice.npy"))
    assert code == 0 and done["version"] == 1 and done["voxels_changed"] == int(np.take(truth, hint["index"], axis=axis).sum())
    code, history, _ = run(capsys, url, CASE, "history", "--label", label_name)  # no --model: the session's own
    assert code == 0 and [(h["op"], h["item"]["index"]) for h in history] == [("correction", hint["index"])]
    code, undone, _ = run(capsys, url, CASE, "undo", "--label", label_name)
    assert code == 0 and undone["op"] == "undo"
    np.save(tmp_path / "wrong.npy", np.zeros((3, 3), bool))
    code, _, err = run(capsys, url, CASE, "submit", "--label", label_name, "--axis", "z", "--index", "40", "--mask", str(tmp_path / "wrong.npy"))
    assert code == 2 and "mask has shape (3, 3)" in err and "Fix:" in err
    code, _, err = run(capsys, url, CASE, "redo", "--label", "never" + label_name)
    assert code == 2 and "no annotation session to resume" in err


def test_the_loop_imports_no_gui_toolkit():
    import subprocess
    import sys

    code = "import sys, spadkit.active, spadkit.active.command; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for gui in ("napari", "qtpy", "PyQt5", "PyQt6", "PySide6", "ipywidgets", "matplotlib"):
        assert f"'{gui}'" not in loaded
    assert "'torch'" in loaded  # the check sees real imports


@pytest.mark.slow
def test_a_full_finetune_runs_headless_from_the_shell(store, mni_store, truth, label_name, capsys, two_token_crops):
    session = AnnotationSession(store, CASE, tiny_model(), label_name)
    for axis, index in [(0, 40), (1, 55), (2, 50)]:
        session.submit_correction(axis, index, np.take(truth, index, axis=axis))
    url = str(mni_store[0])
    code, _, err = run(capsys, url, CASE, "finetune", "--label", label_name, "--finetune-steps", "0")
    assert code == 2 and "max_steps must be a positive integer" in err
    code, result, err = run(capsys, url, CASE, "finetune", "--label", label_name, "--finetune-steps", "1", "--device", "cpu")
    assert code == 0 and result["steps"] == 1 and result["validation_dice_before"] == pytest.approx(session.validation_dice())
    assert result["accepted"] == (result["validation_dice_after"] > result["validation_dice_before"]) and "fine-tune" in err
    code, history, _ = run(capsys, url, CASE, "history", "--label", label_name)
    assert [h["op"] for h in history] == ["correction"] * 3 + ["finetune"]
