"""Crash safety of full learning: the fine-tune child SIGKILLed at random moments (seeded) while it starts,
trains, writes or publishes its weights. Nothing half-written is ever scored or swapped in, the job
folders are cleaned, and the session resumes with the model in force."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from spadkit.active import AnnotationSession
from spadkit.active import finetune_worker as worker
from tests.active.conftest import truth_slice
from tests.active.test_crash import SLICES, TRIALS
from tests.mni_session import CASE, tiny_model


@pytest.mark.slow
def test_sigkill_of_a_finetune_child_never_leaves_weights_that_are_swapped_in(store, truth, label_name):
    session = AnnotationSession(store, CASE, tiny_model(), label_name, steps=5)
    for axis, index in SLICES[:3]:
        session.submit_correction(axis, index, truth_slice(truth, axis, index))
    rng = np.random.default_rng(1)
    lifetime = session.start_finetune(max_steps=1, crop_tokens=2).wait(300).seconds  # one uninterrupted run
    models = {p.name for p in (session.folder / "models").iterdir()}
    outcomes = []
    for _ in range(TRIALS):
        job = session.start_finetune(max_steps=1, crop_tokens=2)
        time.sleep(rng.uniform(0.0, 1.2 * lifetime))
        if job.running:
            os.kill(job.process.pid, signal.SIGKILL)
        job.process.join()
        result = session.poll_finetune()
        outcomes.append(job.progress()["state"])
        assert not (job.folder / worker.PARTIAL).exists() and not (job.folder / worker.WEIGHTS).exists()
        if result.accepted:  # it finished before the kill: complete weights, adopted whole
            assert job.progress()["state"] == "done" and Path(result.weights).name == session.backbone_version
            models.add(session.backbone_version)
        else:
            assert result.weights is None
        assert {p.name for p in (session.folder / "models").iterdir()} == models  # nothing half-written appears
    print("fine-tune outcomes after the kills:", {s: outcomes.count(s) for s in set(outcomes)})
    assert outcomes.count("failed") >= TRIALS // 2
    resumed = AnnotationSession.resume(store, CASE, label_name=label_name, steps=5)
    assert resumed.backbone_version == session.backbone_version and resumed.validation_dice() == pytest.approx(session.validation_dice())
