"""Full learning on the MNI152 T1 at 2 mm: a real child process fine-tunes spad_unetr_test on the corrections;
the session scores it on the fixed validation slices and swaps it in only when better; cancel; bad requests."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from spadkit.active import AnnotationSession
from spadkit.active import features_cache as cache
from spadkit.active import finetune_worker as worker
from spadkit.active.history import region_mask
from spadkit.errors import SpadkitError, StoreError
from spadkit.io.omezarr import OMEZarrStore
from spadkit.models import create_model
from tests.active.conftest import truth_slice
from tests.mni_session import CASE, tiny_model

#: Three corrections: two train, the third validation (split_of); a fourth trains again.
PLAN = [(0, 40), (1, 55), (2, 50), (0, 60)]
#: Small and quick: 2 steps on crops of 2x2x2 tokens (32^3 voxels at 2 mm).
QUICK = {"max_steps": 2, "crop_tokens": 2}


def corrected(store: OMEZarrStore, truth: np.ndarray, label_name: str, plan=PLAN) -> AnnotationSession:
    session = AnnotationSession(store, CASE, tiny_model(), label_name, steps=5)
    for axis, index in plan:
        session.submit_correction(axis, index, truth_slice(truth, axis, index))
    return session


def test_a_finetune_runs_in_another_process_learns_from_the_store_and_is_swapped_in_when_better(store, truth, label_name, monkeypatch):
    session = corrected(store, truth, label_name)
    before_model, before_dice = session.backbone_version, session.validation_dice()
    job = session.start_finetune(**QUICK)
    assert job.process.pid != os.getpid()
    spec = json.loads((job.folder / worker.SPEC).read_text())
    assert spec["version"] == session.state_version and spec["device"] == "cpu"  # what to learn from is in the store
    with pytest.raises(SpadkitError, match="still running"):
        session.start_finetune(**QUICK)
    result = job.wait(timeout=300)
    assert job.progress()["state"] == "done" and job.progress()["step"] == 2
    assert result.steps == 2 and result.seconds > 0 and result.validation_dice_before == before_dice
    assert result.accepted == (result.validation_dice_after > result.validation_dice_before)
    assert session.poll_finetune() is None  # the result is returned once
    assert not (job.folder / worker.PARTIAL).exists() and not (job.folder / worker.WEIGHTS).exists()  # moved or deleted
    state = json.loads((session.folder / "session.json").read_text())
    assert state["finetunes"][-1]["job"] == job.id and state["finetunes"][-1]["accepted"] == result.accepted
    row = session.history()[-1]
    assert row["op"] == "finetune" and row["version"] == spec["version"] and row["reason"] == result.reason
    if result.accepted:
        assert session.backbone_version != before_model and result.weights.endswith(session.backbone_version)
        assert session.validation_dice() == pytest.approx(result.validation_dice_after)
        assert session.predict((slice(45, 46),)).model.startswith(session.backbone_version)
    else:
        assert session.backbone_version == before_model and result.weights is None
    resumed = AnnotationSession.resume(store, CASE, label_name=label_name)  # the model in force comes back
    assert resumed.backbone_version == session.backbone_version and resumed.startup["features_from_cache"]


def test_weights_that_score_worse_are_deleted_and_the_session_keeps_its_model(store, truth, label_name, monkeypatch):
    session = corrected(store, truth, label_name)
    before = session.backbone_version
    job = session.start_finetune(**QUICK)
    job.process.join(300)
    real = session._head_dice
    monkeypatch.setattr(session, "_head_dice", lambda head, features: real(head, features) - (0 if features is session.features else 1))
    result = session.poll_finetune()
    assert not result.accepted and result.weights is None and "not above" in result.reason
    assert result.validation_dice_after < result.validation_dice_before
    assert session.backbone_version == before and not (job.folder / worker.WEIGHTS).exists()
    assert sorted(p.name for p in (session.folder / "models").iterdir()) == [before]


def test_the_child_trains_on_training_items_only_and_the_store_mask(store, truth, label_name):
    session = corrected(store, truth, label_name)
    mask, boxes = worker.training_mask(store, CASE, label_name, session.state_version, session.shape)
    np.testing.assert_array_equal(mask, region_mask(session.items, session.shape, "train"))
    assert session.annotated[10, 10, 50] and not mask[10, 10, 50]  # the validation slice x=50 is reviewed, never trained on
    assert mask[40].all() and mask[:, 55].all() and mask.sum() < session.annotated.sum() and len(boxes) == 3
    assert store.read_annotated(CASE, label_name) is not None


def test_cancel_stops_the_child_and_leaves_no_weights(store, truth, label_name):
    session = corrected(store, truth, label_name)
    before = session.backbone_version
    job = session.start_finetune(max_steps=500, crop_tokens=2)
    deadline = time.monotonic() + 300
    while job.progress()["step"] < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.progress()["state"] == "running" and job.progress()["loss"] is not None
    job.cancel()
    assert not job.running and job.progress()["state"] == "cancelled"
    result = session.poll_finetune()
    assert not result.accepted and result.reason.startswith("cancelled") and session.backbone_version == before
    assert not (job.folder / worker.PARTIAL).exists() and not (job.folder / worker.WEIGHTS).exists()


def test_bad_finetune_requests_are_refused_before_any_process_starts(store, mni_store, truth, label_name):
    session = corrected(store, truth, label_name, PLAN[:2])
    with pytest.raises(SpadkitError, match="training and validation corrections, the session has 2 and 0") as info:
        session.start_finetune()
    assert "3 slices" in info.value.fix
    session.submit_correction(2, 50, truth_slice(truth, 2, 50))
    for kwargs, match in [({"max_steps": 0}, "max_steps"), ({"max_steps": 2.5}, "max_steps"), ({"crop_tokens": 0}, "crop_tokens"), ({"device": "gpu7"}, "unknown device")]:
        with pytest.raises(SpadkitError, match=match):
            session.start_finetune(**kwargs)
    assert not (session.folder / "finetune").exists() or not any((session.folder / "finetune").iterdir())
    read_only = AnnotationSession(OMEZarrStore(str(mni_store[0]), mode="r"), CASE, tiny_model(), label_name)
    with pytest.raises(StoreError, match="read-only"):
        read_only.start_finetune()


def test_a_model_without_a_segmentation_variant_cannot_be_finetuned(store, truth, label_name):
    session = AnnotationSession(store, CASE, create_model("spad_eva_test"), label_name, steps=5)
    for axis, index in PLAN[:3]:
        session.submit_correction(axis, index, truth_slice(truth, axis, index))
    with pytest.raises(SpadkitError, match="needs a SPAD-ViT or SPAD-UNETR") as info:
        session.start_finetune()
    assert "spad_unetr_test" in info.value.fix


def test_stale_weights_of_a_dead_job_are_removed_at_session_start(store, truth, label_name):
    session = corrected(store, truth, label_name, PLAN[:3])
    dead, unscored = session.folder / "finetune" / "dead", session.folder / "finetune" / "unscored"
    for job, parent in ((dead, 2**22 + 12345), (unscored, os.getpid())):  # no such process; this one, not polled yet
        (job / worker.PARTIAL).mkdir(parents=True)
        (job / worker.PARTIAL / "model.pt").write_bytes(b"half")
        (job / worker.SPEC).write_text(json.dumps({"parent_pid": parent}))
        worker.write_progress(job, state="running", step=3, pid=2**22 + 12346)
    AnnotationSession(store, CASE, tiny_model(), label_name, steps=5)
    assert not (dead / worker.PARTIAL).exists() and (dead / worker.PROGRESS).is_file()
    assert (unscored / worker.PARTIAL).is_dir()  # its session may still poll it
    assert cache.feature_path(store, CASE, session.backbone_version).is_file()
