"""Crash safety with real processes: SIGKILL at random moments (seeded) while a session submits corrections
of the MNI152 T1 at 2 mm. After every kill every acknowledged correction is in the store with its
content, every version reads back, the store's annotated mask agrees with the session record, and the
next process resumes the session (the fine-tune child's kills: test_crash_finetune.py)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from spadkit.active import AnnotationSession, finetune
from spadkit.active.history import decode, region_mask
from spadkit.io.omezarr import OMEZarrStore
from tests.active.conftest import truth_slice
from tests.mni_session import CASE, tiny_model

TRIALS = 20
#: Slices corrected in turn (x=50 is the 3rd distinct one, hence validation).
SLICES = [(0, 40), (1, 55), (2, 50), (0, 60), (1, 45), (2, 30), (0, 50), (1, 65)]


def submit_until_killed(url: str, label_name: str, truth_file: str, acks: str, first: int) -> None:
    """The child: reopen the session from the store, then submit corrections until killed, acknowledging each
    (one fsync'd JSON line) only after ``submit_correction`` returned."""
    truth = np.load(truth_file)
    session = AnnotationSession(OMEZarrStore(url, mode="a"), CASE, tiny_model(), label_name, steps=5)
    Path(acks + ".ready").write_text(str(time.time()))
    for k in range(first, first + 100):
        axis, index = SLICES[k % len(SLICES)]
        done = session.submit_correction(axis, index, truth_slice(truth, axis, index))
        with open(acks, "a") as f:
            f.write(json.dumps({"version": done.version, "axis": axis, "index": index, "time": time.time()}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def wait_for(path: Path, process, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.stat().st_size:
        assert process.is_alive(), f"the child died before {path.name} (exit code {process.exitcode})"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.02)


def check_store(store: OMEZarrStore, label_name: str, truth: np.ndarray, acked: list[dict]) -> list[dict]:
    """Every version reads back; every acknowledged one holds its slice; the latest annotated mask is the record's."""
    versions = store.label_versions(CASE, label_name)
    assert [v["version"] for v in versions] == list(range(1, len(versions) + 1))
    by_number = {v["version"]: v for v in versions}
    for ack in acked:
        record = decode(by_number[ack["version"]]["message"])
        assert (record["item"]["axis"], record["item"]["index"]) == (ack["axis"], ack["index"])
    latest = store.read_label(CASE, label_name).numpy()[0]
    for ack in acked:
        np.testing.assert_array_equal(np.take(latest, ack["index"], axis=ack["axis"]), truth_slice(truth, ack["axis"], ack["index"]))
    record = decode(versions[-1]["message"])
    stored = store.read_annotated(CASE, label_name)
    expected = region_mask(record["annotated"], latest.shape)
    np.testing.assert_array_equal(expected if stored is None else np.asarray(stored[...], bool), expected)
    return versions


@pytest.mark.slow
def test_sigkill_during_fast_learning_loses_no_acknowledged_correction(mni_store, truth, label_name, tmp_path):
    url = str(mni_store[0])
    np.save(tmp_path / "truth.npy", truth)
    context, rng = finetune._context(), np.random.default_rng(0)
    acked: list[dict] = []
    unacked, per_submit = 0, None
    for trial in range(TRIALS):
        acks = tmp_path / f"acks{trial}.jsonl"
        child = context.Process(target=submit_until_killed, args=(url, label_name, str(tmp_path / "truth.npy"), str(acks), len(acked) + unacked))
        child.start()
        ready = Path(str(acks) + ".ready")
        wait_for(ready, child)
        if per_submit is None:  # the first trial measures one submission on this machine, now
            wait_for(acks, child)
            per_submit = json.loads(acks.read_text().splitlines()[0])["time"] - float(ready.read_text())
        time.sleep(rng.uniform(0.0, 2.5 * per_submit))  # a random moment within the first 2-3 submissions
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        new = [json.loads(line) for line in acks.read_text().splitlines()] if acks.exists() else []
        acked += new
        versions = check_store(OMEZarrStore(url, mode="r"), label_name, truth, acked)
        unacked = len(versions) - len(acked)  # saved, then killed before the acknowledgement: kept, never lost
    print(f"{TRIALS} kills: {len(acked)} acknowledged corrections, {unacked} saved but unacknowledged ({per_submit:.2f} s per submission)")
    assert len(acked) >= TRIALS // 4  # the kills landed inside the loop, not only before it
    session = AnnotationSession.resume(OMEZarrStore(url, mode="a"), CASE, label_name=label_name)
    assert {(a["axis"], a["index"]) for a in acked} <= {(i["axis"], i["index"]) for i in session.items}
    assert session.state_version == len(acked) + unacked and session.head is not None
    np.testing.assert_array_equal(session.annotated, region_mask(session.items, session.shape))
