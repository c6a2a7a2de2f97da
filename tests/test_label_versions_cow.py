"""Copy-on-write label versions: a correction writes only the chunk files it changes, at every level,
shares the rest by hard links, and every version stays a complete, ordinary Zarr array."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from spadkit.check import check_store
from spadkit.io import OMEZarrStore
from spadkit.volume import LabelVolume, Volume
from tests.mni_gm import mni_crop

#: Two real grids from the MNI152 gray-matter map: a 1 mm crop (3 pyramid levels, 2 x 3 x 3 chunks) and a 1 x 1 x 3 mm copy.
GRIDS = {
    "1mm": ((128, 192, 160), 1),
    "1x1x3mm": ((96, 150, 130), 3),
}


def _case(grid: str) -> tuple[Volume, np.ndarray]:
    shape, every = GRIDS[grid]
    image, gm = mni_crop(shape, origin=(30, 20, 20))
    image, gm = image[:, ::every], gm[::every].astype(np.uint8)
    affine = np.diag([1.0, 1.0, float(every), 1.0])
    return Volume((image * 1000).astype(np.int16), affine, modality="MR"), gm


def _store(path: Path, grid: str, *, sharded: bool = False) -> tuple[OMEZarrStore, Volume, np.ndarray]:
    image, gm = _case(grid)
    store = OMEZarrStore(str(path), mode="a", sharded=sharded)
    store.write_case("mni", image, LabelVolume(gm, image.affine))
    return store, image, gm


def _corrections(gm: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, tuple[slice, slice, slice]]]:
    """Three successive one-slice corrections: (label, annotated mask, changed box)."""
    label, annotated, out = gm.copy(), np.zeros(gm.shape, bool), []
    for z, value in ((3, 2), (gm.shape[0] // 2, 0), (gm.shape[0] - 1, 3)):
        label = label.copy()
        label[z, 20:70, 30:90] = value
        annotated = annotated.copy()
        annotated[z] = True
        out.append((label, annotated, (slice(z, z + 1), slice(None), slice(None))))
    return out


def _levels(store: OMEZarrStore, version: int) -> list[np.ndarray]:
    count = len(store.case_attrs("mni")["pyramid_factors_zyx"])
    return [store.read_label("mni", version=version, level=level).numpy() for level in range(count)]


def _chunk_files(store: OMEZarrStore, version: int) -> dict[str, os.stat_result]:
    folder = Path(store.url) / "mni" / "labels" / "seg" / f"v{version:04d}"
    return {str(p.relative_to(folder)): p.stat() for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json"}


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("hint", [True, False], ids=["hint", "compare"])
def test_every_level_of_every_version_equals_a_full_copy_and_unchanged_files_are_shared(tmp_path, monkeypatch, grid, hint):
    store, image, gm = _store(tmp_path / "cow.zarr", grid)
    full, _, _ = _store(tmp_path / "full.zarr", grid)
    for label, annotated, changed in _corrections(gm):
        kwargs = {"annotated": annotated, "changed": changed if hint else None}
        number = store.save_label("mni", LabelVolume(label, image.affine), **kwargs)
        with monkeypatch.context() as patch:
            patch.setattr(OMEZarrStore, "_copy_on_write", False)
            assert full.save_label("mni", LabelVolume(label, image.affine), **kwargs) == number
        for mine, reference in zip(_levels(store, number), _levels(full, number)):
            np.testing.assert_array_equal(mine, reference)
        np.testing.assert_array_equal(store.read_annotated("mni", version=number)[:], annotated)
        entry, full_entry = store.label_versions("mni")[-1], full.label_versions("mni")[-1]
        assert full_entry["chunks_shared"] == 0 and full_entry["chunks_written"] == entry["chunks_written"] + entry["chunks_shared"]
        assert entry["chunks_shared"] > 0 and entry["chunks_written"] > 0
        if number > 2:  # the first correction writes the first annotated mask in full
            assert entry["bytes_written"] < full_entry["bytes_written"] / 2, (entry, full_entry)
        # a shared file is the previous version's file (one inode), a written one is new
        before, after = _chunk_files(store, number - 1), _chunk_files(store, number)
        shared = [key for key in after if key in before and after[key].st_ino == before[key].st_ino]
        assert len(shared) >= entry["chunks_shared"] - sum(1 for key in after if key.startswith("annotated")) and shared
        assert all(after[key].st_nlink >= 2 for key in shared)
    assert check_store(store.url).ok
    np.testing.assert_array_equal(store.read_label("mni", version=1).numpy()[0], gm)  # the ingested version is untouched


def test_each_version_is_an_ordinary_zarr_array_for_any_reader(tmp_path):
    store, image, gm = _store(tmp_path / "s.zarr", "1mm")
    label, annotated, changed = _corrections(gm)[0]
    number = store.save_label("mni", LabelVolume(label, image.affine), annotated=annotated, changed=changed)
    plain = zarr.open_array(str(tmp_path / "s.zarr" / "mni" / "labels" / "seg" / f"v{number:04d}" / "0"), mode="r")
    np.testing.assert_array_equal(plain[0], label)
    mask = zarr.open_array(str(tmp_path / "s.zarr" / "mni" / "labels" / "seg" / f"v{number:04d}" / "annotated"), mode="r")
    np.testing.assert_array_equal(mask[:], annotated)


def test_deleting_or_rewriting_an_old_version_leaves_the_newer_ones_intact(tmp_path):
    store, image, gm = _store(tmp_path / "s.zarr", "1mm")
    corrections = _corrections(gm)
    for label, annotated, changed in corrections:
        store.save_label("mni", LabelVolume(label, image.affine), annotated=annotated, changed=changed)
    expected = {number: _levels(store, number) for number in (3, 4)}
    seg = tmp_path / "s.zarr" / "mni" / "labels" / "seg"
    # a repair tool rewrites v0003's chunks through Zarr: every file is replaced, never written in place
    old = zarr.open_array(str(seg / "v0003" / "0"), mode="a")
    old[:] = 7
    shutil.rmtree(seg / "v0002")  # and an older version is deleted outright
    for level, voxels in enumerate(expected[4]):
        np.testing.assert_array_equal(OMEZarrStore(store.url).read_label("mni", version=4, level=level).numpy(), voxels)
    assert OMEZarrStore(store.url).read_label("mni", version=3).numpy().min() == 7
    np.testing.assert_array_equal(OMEZarrStore(store.url).read_label("mni", version=3, level=1).numpy(), expected[3][1])
    # the next save builds on v0004 and is still right
    label = corrections[-1][0].copy()
    label[10, :5, :5] = 1
    number = store.save_label("mni", LabelVolume(label, image.affine), changed=(slice(10, 11), slice(0, 5), slice(0, 5)))
    np.testing.assert_array_equal(store.read_label("mni", version=number).numpy()[0], label)


def test_a_hint_relative_to_an_older_version_is_not_trusted(tmp_path):
    """Writer B edits v1 while writer A saves v2: B's hint no longer describes the latest version."""
    store, image, gm = _store(tmp_path / "s.zarr", "1mm")
    a = gm.copy()
    a[5] = 1
    assert store.save_label("mni", LabelVolume(a, image.affine), changed=(slice(5, 6), slice(None), slice(None)), base_version=1) == 2
    b = gm.copy()
    b[40, 10:20, 10:20] = 3
    number = store.save_label("mni", LabelVolume(b, image.affine), changed=(slice(40, 41), slice(10, 20), slice(10, 20)), base_version=1)
    np.testing.assert_array_equal(store.read_label("mni", version=number).numpy()[0], b)  # A's slice 5 is not smuggled in
    np.testing.assert_array_equal(store.read_label("mni", version=2).numpy()[0], a)


def test_saving_the_same_label_again_writes_no_chunk(tmp_path):
    store, image, gm = _store(tmp_path / "s.zarr", "1x1x3mm")
    number = store.save_label("mni", LabelVolume(gm, image.affine))
    entry = store.label_versions("mni")[-1]
    assert entry["chunks_written"] == 0 and entry["chunks_shared"] > 0
    assert entry["bytes_written"] < 10_000  # the arrays' metadata only
    np.testing.assert_array_equal(store.read_label("mni", version=number).numpy()[0], gm)


@pytest.mark.parametrize("hint", [True, False], ids=["hint", "compare"])
def test_a_sharded_store_shares_whole_shards_one_row_of_chunks_along_z_each(tmp_path, hint):
    store, image, gm = _store(tmp_path / "s.zarr", "1x1x3mm", sharded=True)
    level0 = store.read_label("mni").array
    assert level0.shards[1] == level0.chunks[1] and level0.shards[2] >= level0.shape[2]  # a shard per row of chunks
    rows = -(-level0.shape[1] // level0.shards[1])
    for label, annotated, changed in _corrections(gm):
        number = store.save_label("mni", LabelVolume(label, image.affine), annotated=annotated, changed=changed if hint else None)
        entry = store.label_versions("mni")[-1]
        levels = len(store.case_attrs("mni")["pyramid_factors_zyx"])
        assert 0 < entry["chunks_written"] <= 2 * levels + 1  # one row per level (the mask: one row too, or all of it at first)
        assert entry["chunks_shared"] >= rows - 1
        np.testing.assert_array_equal(store.read_label("mni", version=number).numpy()[0], label)
        np.testing.assert_array_equal(store.read_annotated("mni", version=number)[:], annotated)
    assert check_store(store.url).ok


def test_a_base_missing_chunk_files_is_written_in_full(tmp_path):
    """Stores from before every chunk was written lack all-background chunk files: nothing to link, so a full write."""
    store, image, gm = _store(tmp_path / "s.zarr", "1x1x3mm")
    attrs = store.case_attrs("mni")
    del attrs["all_chunks_written"]
    store.root["mni"].attrs["spadkit"] = attrs
    seg, first_chunk = tmp_path / "s.zarr" / "mni" / "labels" / "seg", Path("0", "c", "0", "0", "0", "0")
    (seg / "v0001" / first_chunk).unlink()  # read as background from now on
    label = gm.copy()
    label[0, :10, :10] = 0
    label[-1, 5:9, 5:9] = 2
    old = OMEZarrStore(store.url, mode="a")
    number = old.save_label("mni", LabelVolume(label, image.affine), changed=(slice(gm.shape[0] - 1, None), slice(5, 9), slice(5, 9)))
    entry = old.label_versions("mni")[-1]
    assert entry["chunks_shared"] == 0 and entry["chunks_written"] > 0
    np.testing.assert_array_equal(old.read_label("mni", version=number).numpy()[0], label)  # all of it, as submitted
    assert (seg / "v0002" / first_chunk).exists()


def test_a_remote_store_writes_every_version_in_full():
    import fsspec

    url = "memory://spadkit-cow-test.zarr"
    image, gm = _case("1x1x3mm")
    store = OMEZarrStore(url, mode="a")
    try:
        store.write_case("mni", image, LabelVolume(gm, image.affine))
        label, annotated, changed = _corrections(gm)[0]
        number = store.save_label("mni", LabelVolume(label, image.affine), annotated=annotated, changed=changed)
        entry = store.label_versions("mni")[-1]
        assert entry["chunks_shared"] == 0 and entry["bytes_written"] > 0
        np.testing.assert_array_equal(store.read_label("mni", version=number).numpy()[0], label)
        np.testing.assert_array_equal(store.read_label("mni", version=1).numpy()[0], gm)
    finally:
        fsspec.filesystem("memory").rm("/spadkit-cow-test.zarr", recursive=True)


def test_written_files_and_folders_are_fsynced_before_the_metadata_points_at_them(tmp_path, monkeypatch):
    import spadkit.io.zarrstore as zarrstore

    store, image, gm = _store(tmp_path / "s.zarr", "1mm")
    events: list[tuple[str, Path]] = []
    real_file, real_dir, real_replace = zarrstore.fsync_file, zarrstore.fsync_dir, zarrstore._replace_file
    monkeypatch.setattr(zarrstore, "fsync_file", lambda path: (events.append(("file", Path(path))), real_file(path))[1])
    monkeypatch.setattr(zarrstore, "fsync_dir", lambda path: (events.append(("dir", Path(path))), real_dir(path))[1])
    monkeypatch.setattr(zarrstore, "_replace_file", lambda path, data: (events.append(("replace", Path(path))), real_replace(path, data))[1])
    label, annotated, changed = _corrections(gm)[1]
    number = store.save_label("mni", LabelVolume(label, image.affine), annotated=annotated, changed=changed)
    seg = tmp_path / "s.zarr" / "mni" / "labels" / "seg"
    switch = events.index(("replace", seg / "zarr.json"))  # the metadata that makes the version visible
    synced_files = {path for kind, path in events[:switch] if kind == "file"}
    synced_dirs = {path for kind, path in events[:switch] if kind == "dir"}
    version = seg / f"v{number:04d}"
    new_files = {p for p in version.rglob("*") if p.is_file() and p.stat().st_nlink == 1 and p.name != "zarr.json"}
    assert new_files and new_files <= synced_files
    every_folder = {p for p in version.rglob("*") if p.is_dir()} | {version, seg}
    assert every_folder <= synced_dirs  # links and new files are directory entries too
