"""The loop as a person runs it: a simulated annotator corrects suggested slices; a session killed mid-round resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from spadkit.active import AnnotationSession, dice
from spadkit.active import features_cache as cache
from spadkit.active.suggest import strided_grid
from tests.active.conftest import truth_slice
from tests.mni_session import CASE, tiny_model

#: Held-out Dice after ROUNDS suggested slices must beat the one after the first slice by this much.
ROUNDS = 6
MARGIN = 0.01


@torch.no_grad()
def heldout_dice(session: AnnotationSession, truth: np.ndarray, stride: int = 3) -> float:
    """Gray-matter Dice on every ``stride``-th voxel that no correction covers."""
    _, index = strided_grid(session.shape, stride)
    keep = ~session.annotated[index[:, 0], index[:, 1], index[:, 2]]
    index = index[torch.from_numpy(keep)]
    pred = session.head(session.features.gather(index)).argmax(1).numpy()
    return dice(pred, truth[index[:, 0], index[:, 1], index[:, 2]], 2)


@pytest.mark.slow
def test_a_simulated_annotator_improves_heldout_dice(full_store, full_truth, label_name):
    store, truth = full_store, full_truth
    session = AnnotationSession(store, CASE, tiny_model(), label_name)
    scores, edits = [], []
    for _ in range(ROUNDS):
        hint = session.suggest_next()
        session.predict(tuple(slice(hint.index, hint.index + 1) if a == hint.axis else slice(None) for a in range(3)))
        result = session.submit_correction(hint.axis, hint.index, truth_slice(truth, hint.axis, hint.index))
        scores.append(heldout_dice(session, truth))
        edits.append(result.edit_dice)
    print("held-out Dice per round", np.round(scores, 3), "edit Dice", edits)
    assert scores[-1] >= scores[0] + MARGIN
    assert edits[0] is None and all(0 <= e <= 1 for e in edits[1:])
    assert len({(i["axis"]) for i in session.items}) >= 2  # suggestions use more than one axis
    assert [r["op"] for r in session.history()] == ["correction"] * ROUNDS


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import spadkit.io.omezarr as omezarr
    from spadkit.active import AnnotationSession
    from spadkit.io.omezarr import OMEZarrStore
    from tests.mni_session import tiny_model

    url, name, slices_file, when = sys.argv[1:5]
    slices = np.load(slices_file)
    store = OMEZarrStore(url, mode="a")
    session = AnnotationSession(store, "mni", tiny_model(), name, steps=5)
    plan = [(0, 35), (1, 50), (2, 30), (0, 60)]
    for k, (axis, index) in enumerate(plan[:3]):
        session.submit_correction(axis, index, slices[f"s{k}"])
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if when == "after_save":  # the version is on disk, the head never refitted
        real = store.save_label
        store.save_label = lambda *a, **k: (real(*a, **k), die())[0]
    else:  # killed while the label chunks are written, before the metadata points at them
        real_write = omezarr.write_levels
        omezarr.write_levels = lambda *a, **k: (real_write(*a, **k), die())[0]
    session.submit_correction(0, 60, slices["s3"])
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["after_save", "while_saving"])
def test_a_killed_session_resumes_its_corrections_split_and_model(store, truth, label_name, tmp_path, when):
    plan = [(0, 35), (1, 50), (2, 30), (0, 60)]
    np.savez(tmp_path / "slices.npz", **{f"s{k}": truth_slice(truth, a, i) for k, (a, i) in enumerate(plan)})
    child = subprocess.run(
        [sys.executable, "-c", CHILD, store.url, label_name, str(tmp_path / "slices.npz"), when],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    kept = plan if when == "after_save" else plan[:3]
    session = AnnotationSession.resume(store, CASE, label_name=label_name)  # the model comes back from the session folder
    assert session.backbone_version == cache.model_hash(tiny_model())
    assert [(i["axis"], i["index"]) for i in session.items] == kept
    assert [i["split"] for i in session.items] == ["train", "train", "validation", "train"][: len(kept)]
    assert session.head is not None and session.validation_dice() is not None
    for axis, index in kept:
        np.testing.assert_array_equal(np.take(session.label, index, axis=axis), truth_slice(truth, axis, index))
    assert len(store.label_versions(CASE, label_name)) == len(kept)
    nxt = session.submit_correction(1, 70, truth_slice(truth, 1, 70))  # the store reuses an orphaned version folder
    assert nxt.version == len(kept) + 1
    assert os.path.isdir(Path(store.url) / CASE / "labels" / label_name / f"v{nxt.version:04d}")
