"""The versioned OME-Zarr store: geometry, pyramids, label versions, completeness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from spadkit.errors import GeometryMismatchError, StoreError
from spadkit.io import OMEZarrStore, read_volume
from spadkit.io.omezarr import chunk_shape, pyramid_factors
from spadkit.volume import LabelVolume, Volume


@pytest.fixture(scope="module")
def mni_crop(mni_t1_path) -> Volume:
    """A real 96x120x100 crop of the MNI152 T1 (1 mm), in memory."""
    full = read_volume(mni_t1_path)
    crop = full.array[:, 40:136, 50:170, 50:150].compute().astype(np.int16)
    affine = full.affine.copy()
    affine[:3, 3] = (full.affine @ [50, 50, 40, 1])[:3]  # world position of voxel (x=50, y=50, z=40)
    return Volume(crop, affine, modality="MR")


@pytest.fixture
def store(tmp_path) -> OMEZarrStore:
    return OMEZarrStore(str(tmp_path / "s.zarr"), mode="a")


@pytest.mark.parametrize(
    ("shape", "spacing", "expected"),
    [
        ((189, 233, 197), (1.0, 1.0, 1.0), (1, 64, 64, 64)),
        ((63, 233, 197), (3.0, 1.0, 1.0), (1, 16, 64, 64)),
        ((40, 512, 512), (5.0, 0.7, 0.7), (1, 16, 64, 64)),
        ((1, 2048, 2500), (1.0, 0.14, 0.14), (1, 1, 256, 256)),
        ((20, 30, 30), (1.0, 1.0, 1.0), (1, 20, 30, 30)),
    ],
)
def test_chunk_shape_covers_similar_physical_extent(shape, spacing, expected):
    assert chunk_shape(shape, spacing) == expected


def test_pyramid_makes_anisotropic_volume_isotropic_before_halving_z():
    factors = pyramid_factors((63, 233, 197), (3.0, 1.0, 1.0))
    assert factors[:3] == [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    assert all(f[0] <= f[1] for f in factors)


def test_pyramid_never_halves_a_single_slice():
    assert all(f[0] == 1 for f in pyramid_factors((1, 1024, 1024), (1.0, 0.2, 0.2)))


def test_write_and_read_case_keeps_voxels_and_geometry(store, mni_crop):
    store.write_case("brain", mni_crop)
    back = store.read_image("brain")
    assert isinstance(back.array, zarr.Array)  # lazy
    np.testing.assert_array_equal(back.numpy(), mni_crop.numpy())
    np.testing.assert_allclose(back.affine, mni_crop.affine)
    assert back.modality == "MR"
    assert store.cases() == ["brain"]


def test_ngff_metadata_gives_spacing_and_origin_per_level(store, mni_crop):
    store.write_case("brain", mni_crop)
    meta = store.root["brain"].attrs["ome"]
    assert meta["version"] == "0.5"
    assert [a["name"] for a in meta["multiscales"][0]["axes"]] == ["c", "z", "y", "x"]
    datasets = meta["multiscales"][0]["datasets"]
    level1 = store.read_image("brain", level=1)
    assert datasets[1]["coordinateTransformations"][0]["scale"] == [1.0, *level1.spacing]
    # level-1 voxel centres sit in the middle of 2x2x2 blocks of level 0
    x0, y0, z0 = mni_crop.origin
    assert datasets[1]["coordinateTransformations"][1]["translation"] == pytest.approx([0, z0 + 0.5, y0 + 0.5, x0 + 0.5])
    np.testing.assert_allclose(level1.origin, np.array(mni_crop.origin) + 0.5)
    block_mean = mni_crop.numpy()[0, :2, :2, :2].mean()
    assert level1.numpy()[0, 0, 0, 0] == pytest.approx(block_mean, abs=0.5)


def test_label_versions_are_kept_and_latest_is_default(store, mni_crop):
    seg = (mni_crop.numpy() > 60).astype(np.uint8)
    store.write_case("brain", mni_crop, LabelVolume(seg, mni_crop.affine, classes={0: "bg", 1: "tissue"}))
    edited = seg.copy()
    edited[0, 48] = 0  # an annotator clears one slice
    version = store.save_label("brain", LabelVolume(edited, mni_crop.affine), author="ana", message="cleared z=48")
    assert version == 2
    versions = store.label_versions("brain")
    assert [(v["version"], v["path"], v["message"]) for v in versions] == [(1, "v0001", "ingested"), (2, "v0002", "cleared z=48")]
    assert versions[1]["author"] == "ana"
    np.testing.assert_array_equal(store.read_label("brain").numpy(), edited)
    np.testing.assert_array_equal(store.read_label("brain", version=1).numpy(), seg)
    assert store.read_label("brain").classes == {0: "bg", 1: "tissue"}
    # the NGFF metadata that viewers read points at the latest version
    datasets = store.root["brain/labels/seg"].attrs["ome"]["multiscales"][0]["datasets"]
    assert datasets[0]["path"] == "v0002/0"
    assert store.root["brain/labels"].attrs["ome"]["labels"] == ["seg"]


def test_interrupted_label_save_keeps_previous_version(store, mni_crop, monkeypatch):
    seg = (mni_crop.numpy() > 60).astype(np.uint8)
    store.write_case("brain", mni_crop, LabelVolume(seg, mni_crop.affine))
    import spadkit.io.omezarr as omezarr

    real = omezarr.write_levels

    def crash_after_arrays(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # the process dies before the metadata switch

    monkeypatch.setattr(omezarr, "write_levels", crash_after_arrays)
    with pytest.raises(KeyboardInterrupt):
        store.save_label("brain", LabelVolume(np.zeros_like(seg), mni_crop.affine))
    monkeypatch.setattr(omezarr, "write_levels", real)
    reopened = OMEZarrStore(store.url)
    assert [v["version"] for v in reopened.label_versions("brain")] == [1]
    np.testing.assert_array_equal(reopened.read_label("brain").numpy(), seg)
    # the next save reuses the orphaned folder cleanly
    assert OMEZarrStore(store.url, mode="a").save_label("brain", LabelVolume(np.ones_like(seg), mni_crop.affine)) == 2
    assert OMEZarrStore(store.url).read_label("brain").numpy().min() == 1


def test_label_on_another_grid_is_refused(store, mni_crop):
    store.write_case("brain", mni_crop)
    shifted = mni_crop.affine.copy()
    shifted[0, 3] += 2.0
    with pytest.raises(GeometryMismatchError, match="affine differs"):
        store.save_label("brain", LabelVolume(np.zeros(mni_crop.shape, np.uint8), shifted))
    assert store.label_names("brain") == []


def test_case_without_completion_marker_is_not_trusted(store, mni_crop):
    store.write_case("done", mni_crop)
    half = store.root.create_group("half")
    half.create_array("0", shape=(1, 4, 4, 4), dtype="int16")
    assert store.cases() == ["done"]
    assert store.incomplete_cases() == ["half"]
    with pytest.raises(StoreError, match="no complete case 'half'"):
        store.read_image("half")


@pytest.mark.parametrize("bad_id", ["labels", "../escape", "", "a/b"])
def test_invalid_case_ids_are_refused(store, mni_crop, bad_id):
    with pytest.raises(StoreError, match="invalid case id"):
        store.write_case(bad_id, mni_crop)


def test_sharded_store_packs_each_level_into_one_shard(tmp_path, mni_crop):
    store = OMEZarrStore(str(tmp_path / "sharded.zarr"), mode="a", sharded=True)
    store.write_case("brain", mni_crop)
    level0 = store.root["brain/0"]
    assert level0.shards == tuple(-(-s // c) * c for s, c in zip(level0.shape, level0.chunks))
    np.testing.assert_array_equal(store.read_image("brain").numpy(), mni_crop.numpy())
    assert len(list((tmp_path / "sharded.zarr" / "brain" / "0" / "c").rglob("*"))) <= 8


def test_missing_store_and_foreign_group_have_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="no OME-Zarr store"):
        OMEZarrStore(str(tmp_path / "nope.zarr"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not written by spadkit"):
        OMEZarrStore(str(tmp_path / "plain.zarr"))


def test_store_metadata_is_plain_json_on_disk(store, mni_crop):
    store.write_case("brain", mni_crop)
    doc = json.loads((Path(store.url) / "brain" / "zarr.json").read_text())
    assert doc["attributes"]["spadkit"]["complete"] is True
    assert doc["attributes"]["spadkit"]["spacing_zyx_mm"] == [1.0, 1.0, 1.0]


def _world_centroid(label: LabelVolume) -> np.ndarray:
    """World (x, y, z) mm of the centroid of a label's foreground, through the label's own affine."""
    zyx = np.argwhere(label.numpy()[0] > 0).mean(axis=0)
    return (label.affine @ [*zyx[::-1], 1.0])[:3]


def test_label_pyramid_levels_stay_on_their_affine(store):
    """A ball at 0.78 mm: every level's label lands where its affine says (the first-voxel rule was 0.39 mm off at level 1)."""
    spacing = (0.78, 0.78, 0.78)
    zz, yy, xx = np.mgrid[:64, :160, :160]
    ball = ((zz - 31.5) ** 2 + (yy - 79.5) ** 2 + (xx - 79.5) ** 2 <= 20**2).astype(np.uint8)
    image = Volume.from_spacing(ball.astype(np.int16) * 100, spacing, origin=(-50.0, 10.0, 3.0))
    store.write_case("ball", image, LabelVolume(ball, image.affine))
    level0 = _world_centroid(store.read_label("ball"))
    assert store.case_attrs("ball")["pyramid_factors_zyx"][:3] == [[1, 1, 1], [2, 2, 2], [4, 4, 4]]
    for level in (1, 2):
        label = store.read_label("ball", level=level)
        np.testing.assert_allclose(_world_centroid(label), level0, atol=0.05)
        assert set(np.unique(label.numpy())) == {0, 1}  # a mode, not an average: no new values


def test_block_mode_takes_the_most_frequent_value_and_the_smaller_on_ties():
    from spadkit.io.pyramid import block_mode

    rows = np.array([[3, 1, 3, 2], [5, 5, 0, 0], [7, 7, 7, 7]])
    np.testing.assert_array_equal(block_mode(rows), [3, 0, 7])


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "labels", "../seg"])
def test_invalid_label_names_are_refused_and_change_nothing(store, mni_crop, bad):
    seg = (mni_crop.numpy() > 60).astype(np.uint8)
    store.write_case("brain", mni_crop, LabelVolume(seg, mni_crop.affine))
    with pytest.raises(StoreError, match="invalid label name"):
        store.save_label("brain", LabelVolume(seg, mni_crop.affine), name=bad)
    assert store.label_names("brain") == ["seg"]
    assert sorted(p.name for p in (Path(store.url) / "brain" / "labels").iterdir()) == ["seg", "zarr.json"]


def test_a_format_1_store_stays_readable_and_is_upgraded_by_a_write(store, mni_crop):
    store.write_case("old", mni_crop, attrs={"intensity": [{"min": 0.0, "max": 1.0, "mean": 0.5, "std": 0.1, "count": 1}]})
    attrs = store.case_attrs("old")
    for key in ("case_format", "spacing_assumed", "all_chunks_written"):
        del attrs[key]
    store.root["old"].attrs["spadkit"] = attrs  # as spadkit wrote cases before format 2
    store.update_info(store_format=1)
    old = OMEZarrStore(store.url)
    assert old.info["store_format"] == 1 and old.cases() == ["old"]
    np.testing.assert_array_equal(old.read_image("old").numpy(), mni_crop.numpy())
    assert old.read_image("old").meta["spacing_assumed"] is False
    writer = OMEZarrStore(store.url, mode="a")
    writer.write_case("new", mni_crop)
    assert writer.info["store_format"] == 2 and writer.case_attrs("new")["case_format"] == 2


def test_spacing_assumed_is_recorded_from_the_volume(store, mni_crop):
    assumed = Volume(mni_crop.numpy(), mni_crop.affine, meta={"spacing_assumed": True})
    store.write_case("png_like", assumed)
    assert store.case_attrs("png_like")["spacing_assumed"] is True
    assert store.read_image("png_like").meta["spacing_assumed"] is True


def test_metadata_is_replaced_atomically_on_local_disk(store, mni_crop, monkeypatch):
    store.write_case("brain", mni_crop)
    import spadkit.io.zarrstore as zarrstore

    def dies_while_writing(path, data):
        with zarrstore.atomic_path(path) as tmp:
            Path(tmp).write_bytes(data[: len(data) // 2])
            raise OSError("No space left on device")

    monkeypatch.setattr(zarrstore, "_replace_file", dies_while_writing)
    with pytest.raises(OSError, match="No space"):
        store.update_info(dataset="renamed")
    monkeypatch.undo()
    assert OMEZarrStore(store.url).info.get("dataset") is None  # the old document is intact
    assert not [p for p in Path(store.url).iterdir() if "partial" in p.name]
