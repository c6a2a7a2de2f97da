"""Crash safety of label saves with real processes: a writer killed (SIGKILL) at random moments loses
no acknowledged version and leaves the store readable, consistent and passing `spadkit check`."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

from spadkit.check import check_store
from spadkit.io import OMEZarrStore
from spadkit.io.pyramid import downsample
from spadkit.volume import LabelVolume, Volume
from tests.mni_gm import mni_crop

TRIALS = 20
#: A 1 x 1 x 3 mm copy of an MNI152 gray-matter crop: (32, 150, 130) voxels, 2 levels, 2 x 3 x 3 chunks.
SHAPE, EVERY = (96, 150, 130), 3
REGION = (slice(10, 60), slice(20, 80))  # (y, x) of each correction


def _gm() -> tuple[Volume, np.ndarray]:
    image, gm = mni_crop(SHAPE, origin=(30, 30, 30))
    affine = np.diag([1.0, 1.0, float(EVERY), 1.0])
    return Volume((image[:, ::EVERY] * 1000).astype(np.int16), affine), gm[::EVERY].astype(np.uint8)


def _slice_of(seq: int, depth: int) -> int:
    return (seq * 7) % depth


def submitted(gm: np.ndarray, seq: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The label and annotated mask of the ``seq``-th save (a pure function of ``seq``: the test knows every one)."""
    label = gm.copy()
    if seq:
        label[_slice_of(seq, len(gm)), REGION[0], REGION[1]] = seq % 3 + 1
    if seq % 4 == 0:
        return label, None  # fully annotated
    annotated = np.zeros(gm.shape, bool)
    annotated[[_slice_of(seq, len(gm)), _slice_of(seq - 1, len(gm))]] = True
    return label, annotated


def _seq(entry: dict) -> int:
    return int(entry["message"].removeprefix("seq="))


def _writer(url: str, ack: int) -> None:
    """Save versions in a loop; after each save returns, write ``version seq`` to the pipe ``ack``."""
    image, gm = _gm()
    store = OMEZarrStore(url, mode="a")
    latest = store.label_versions("mni")[-1]
    seq = _seq(latest)
    os.write(ack, b"ready\n")
    while True:
        seq += 1
        label, annotated = submitted(gm, seq)
        rows = sorted({_slice_of(seq, len(gm)), _slice_of(seq - 1, len(gm))})
        changed = None if seq % 3 == 0 else (slice(rows[0], rows[-1] + 1), REGION[0], REGION[1])  # vs the previous seq
        number = store.save_label("mni", LabelVolume(label, image.affine), message=f"seq={seq}", annotated=annotated, changed=changed, base_version=latest["version"])
        latest = {"version": number}
        os.write(ack, f"{number} {seq}\n".encode())


def _verify(url: str, gm: np.ndarray, acknowledged: dict[int, int], *, since: int = 0, all_levels: bool = False) -> int:
    """Every listed version (after ``since``) reads back as submitted; every acknowledged one is listed.
    Returns the number of versions."""
    store = OMEZarrStore(url)
    versions = store.label_versions("mni")
    assert [v["version"] for v in versions] == list(range(1, len(versions) + 1))
    listed = {v["version"]: _seq(v) for v in versions}
    missing = {number: seq for number, seq in acknowledged.items() if listed.get(number) != seq}
    assert not missing, f"acknowledged saves lost: {missing}"
    factors = store.case_attrs("mni")["pyramid_factors_zyx"]
    for number, seq in listed.items():
        if number <= since:
            continue
        label, annotated = submitted(gm, seq)
        expected = label[None]
        for level in range(len(factors) if all_levels else 1):
            if level:
                expected = downsample(expected, [f // p for f, p in zip(factors[level], factors[level - 1])], label=True)
            np.testing.assert_array_equal(store.read_label("mni", version=number, level=level).numpy(), expected, err_msg=f"v{number} level {level}")
        stored = store.read_annotated("mni", version=number)
        assert (stored is None) == (annotated is None), f"v{number}"
        if annotated is not None:
            np.testing.assert_array_equal(stored[:], annotated, err_msg=f"v{number} annotated")
    return len(versions)


@pytest.mark.slow
def test_a_writer_killed_at_random_moments_loses_no_acknowledged_version(tmp_path):
    image, gm = _gm()
    url = str(tmp_path / "s.zarr")
    OMEZarrStore(url, mode="a").write_case("mni", image)
    start = time.perf_counter()
    OMEZarrStore(url, mode="a").save_label("mni", LabelVolume(submitted(gm, 0)[0], image.affine), message="seq=0")
    window = 3 * (time.perf_counter() - start)  # kills land anywhere in about three saves, however loaded the machine
    fork = mp.get_context("fork")  # the writer starts with everything imported: each trial is one kill, not one import
    seg = tmp_path / "s.zarr" / "mni" / "labels" / "seg"
    rng, acknowledged, killed_mid_save, count = np.random.default_rng(0), {}, 0, 1
    for trial in range(TRIALS):
        read, write = os.pipe()
        writer = fork.Process(target=_writer, args=(url, write), daemon=True)
        writer.start()
        os.close(write)
        with os.fdopen(read) as pipe:
            assert pipe.readline() == "ready\n", f"trial {trial}: the writer did not start"
            time.sleep(rng.uniform(0.0, window))
            os.kill(writer.pid, signal.SIGKILL)
            writer.join(timeout=30)
            lines = pipe.read().split()
        assert writer.exitcode == -signal.SIGKILL
        acknowledged.update({int(number): int(seq) for number, seq in zip(lines[::2], lines[1::2])})
        count = _verify(url, gm, acknowledged, since=count)
        killed_mid_save += (seg / f"v{count + 1:04d}").is_dir()  # the folder of a save the kill interrupted
    assert len(acknowledged) >= TRIALS // 3 and killed_mid_save >= TRIALS // 4, (len(acknowledged), killed_mid_save)
    count = _verify(url, gm, acknowledged, all_levels=True)
    print(f"{count} versions, {len(acknowledged)} acknowledged, {killed_mid_save} of {TRIALS} kills inside a save's writes")
    report = check_store(url)
    assert report.ok, report.summary()
    for number in range(1, count + 1):  # a version's folder holds no temporary file of an interrupted write
        assert not [p for p in (seg / f"v{number:04d}").rglob("*") if ".partial" in p.name]
