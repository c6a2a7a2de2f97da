"""Concurrent writers with real processes: label saves get distinct, whole versions (full and copy-on-write);
ingest runs lock the store."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import numpy as np
import pytest

from spadkit.errors import StoreError
from spadkit.ingest import ingest
from spadkit.io import OMEZarrStore
from spadkit.io.lock import store_lock
from spadkit.io.omezarr import INGEST_LOCK
from spadkit.volume import LabelVolume, Volume
from tests.conftest import write_nifti_array

TRIALS = 10
SHAPE = (24, 96, 96)  # (Z, Y, X): a save takes long enough for two to overlap


def _saver(url: str, value: int, barrier, results) -> None:
    """One writer process: for every trial, wait for the other writer, then save a label full of ``value``."""
    for trial in range(TRIALS):
        store = OMEZarrStore(f"{url}/t{trial}.zarr", mode="a")
        image = store.read_image("case")
        barrier.wait()
        number = store.save_label("case", LabelVolume(np.full(image.shape, value, np.uint8), image.affine), author=f"writer{value}")
        results.put((trial, value, number))


@pytest.fixture(scope="module")
def spawn():
    return mp.get_context("spawn")


def test_two_processes_saving_labels_at_once_get_distinct_complete_versions(tmp_path, spawn):
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    for trial in range(TRIALS):
        store = OMEZarrStore(str(tmp_path / f"t{trial}.zarr"), mode="a")
        store.write_case("case", Volume(np.zeros(SHAPE, np.int16), affine), LabelVolume(np.zeros(SHAPE, np.uint8), affine))
    barrier, results = spawn.Barrier(2), spawn.Queue()
    writers = [spawn.Process(target=_saver, args=(str(tmp_path), value, barrier, results)) for value in (1, 2)]
    for writer in writers:
        writer.start()
    outcomes = [results.get(timeout=120) for _ in range(2 * TRIALS)]
    for writer in writers:
        writer.join(timeout=60)
        assert writer.exitcode == 0
    for trial in range(TRIALS):
        numbers = {value: number for t, value, number in outcomes if t == trial}
        assert sorted(numbers.values()) == [2, 3], f"trial {trial}: both saves must get their own version"
        store = OMEZarrStore(str(tmp_path / f"t{trial}.zarr"))
        assert [v["version"] for v in store.label_versions("case")] == [1, 2, 3]
        for value, number in numbers.items():
            for level in range(len(store.case_attrs("case")["pyramid_factors_zyx"])):
                voxels = store.read_label("case", version=number, level=level).numpy()
                assert np.all(voxels == value), f"trial {trial}: version {number} mixes both writers' voxels"
        latest = store.read_label("case")
        assert latest.meta["version"] == 3 and np.all(latest.numpy() == next(v for v, n in numbers.items() if n == 3))


EDITS = 6  # one-slice corrections per writer, on one shared case
#: Where each writer corrects: (y, x) boxes in different chunks (chunks are 64 voxels in-plane).
REGIONS = ((slice(10, 50), slice(0, 30)), (slice(10, 50), slice(70, 96)))


def _corrector(url: str, writer: int, barrier, results) -> None:
    """One annotator process: read the latest version, correct one slice of it, save copy-on-write with the hint."""
    store = OMEZarrStore(url, mode="a")
    for edit in range(EDITS):
        barrier.wait()  # both writers start from the same latest version, so their saves race
        base = store.label_versions("case")[-1]["version"]
        label = store.read_label("case", version=base)
        voxels = label.numpy().copy()
        z = 2 * edit + writer
        voxels[0, z, REGIONS[writer][0], REGIONS[writer][1]] = writer + 1
        changed = (slice(z, z + 1), *REGIONS[writer])
        number = store.save_label("case", LabelVolume(voxels, label.affine), author=f"writer{writer}", changed=changed, base_version=base, message=f"{base} {z}")
        results.put((writer, number))


def test_two_processes_correcting_one_case_copy_on_write_never_lose_or_mix_a_version(tmp_path, spawn):
    url = str(tmp_path / "s.zarr")
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    store = OMEZarrStore(url, mode="a")
    store.write_case("case", Volume(np.zeros(SHAPE, np.int16), affine), LabelVolume(np.zeros(SHAPE, np.uint8), affine))
    barrier, results = spawn.Barrier(2), spawn.Queue()
    writers = [spawn.Process(target=_corrector, args=(url, writer, barrier, results)) for writer in (0, 1)]
    for writer in writers:
        writer.start()
    outcomes = [results.get(timeout=120) for _ in range(2 * EDITS)]
    for writer in writers:
        writer.join(timeout=60)
        assert writer.exitcode == 0
    versions = OMEZarrStore(url).label_versions("case")
    assert [v["version"] for v in versions] == list(range(1, 2 * EDITS + 2))
    assert sorted(number for _, number in outcomes) == list(range(2, 2 * EDITS + 2))  # every save its own version
    store = OMEZarrStore(url)
    levels = len(store.case_attrs("case")["pyramid_factors_zyx"])
    for entry in versions[1:]:
        base, z = map(int, entry["message"].split())
        writer = int(entry["author"].removeprefix("writer"))
        expected = store.read_label("case", version=base).numpy().copy()
        expected[0, z, REGIONS[writer][0], REGIONS[writer][1]] = writer + 1
        np.testing.assert_array_equal(store.read_label("case", version=entry["version"]).numpy(), expected, err_msg=f"v{entry['version']}")
        full = OMEZarrStore(str(tmp_path / f"full{entry['version']}.zarr"), mode="a")
        full.write_case("case", Volume(np.zeros(SHAPE, np.int16), affine), LabelVolume(expected, affine))
        for level in range(1, levels):  # the coarser levels equal a pyramid written from scratch
            np.testing.assert_array_equal(store.read_label("case", version=entry["version"], level=level).numpy(), full.read_label("case", level=level).numpy())
    assert any(v["chunks_shared"] for v in versions[1:])
    raced = sum(int(v["message"].split()[0]) != v["version"] - 1 for v in versions[1:])
    assert raced >= EDITS // 2  # many saves found a newer version than the one they edited (their hint was not trusted)


def _hold_ingest_lock(url: str, ready) -> None:
    with store_lock(url, INGEST_LOCK, "spadkit ingest of /data/first"):
        ready.set()
        signal.pause()  # until killed


def test_second_ingest_is_refused_while_another_runs_and_a_killed_holder_leaves_no_lock(tmp_path, spawn, rng):
    dataset = tmp_path / "ds"
    dataset.mkdir()
    write_nifti_array(dataset / "a.nii.gz", rng.normal(size=(12, 10, 8)).astype(np.float32))
    url = str(tmp_path / "out.zarr")
    ready = spawn.Event()
    holder = spawn.Process(target=_hold_ingest_lock, args=(url, ready))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(StoreError, match=f"locked by pid {holder.pid} on host") as info:
            ingest(dataset, url, progress=False)
        message = str(info.value)
        assert info.value.path.endswith(os.path.join("out.zarr", ".spadkit", "ingest.lock"))
        assert "spadkit ingest of /data/first" in message and "delete" in message and "killed" in message
        assert not (tmp_path / "out.zarr" / "zarr.json").exists()  # the refused run wrote nothing
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=30)
    report = ingest(dataset, url, progress=False)  # the kernel dropped the dead holder's lock
    assert report.ok and report.written == ["a"]
