"""Label versions: annotated masks (partial supervision) and what each save records."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from spadkit.errors import StoreError
from spadkit.io import OMEZarrStore
from spadkit.volume import LabelVolume, Volume

SHAPE = (20, 72, 80)  # (Z, Y, X) at 1 x 0.8 x 0.8 mm: 2 pyramid levels
AFFINE = np.diag([0.8, 0.8, 1.0, 1.0])


@pytest.fixture
def store(tmp_path, rng) -> OMEZarrStore:
    store = OMEZarrStore(str(tmp_path / "s.zarr"), mode="a")
    image = rng.normal(100, 20, size=SHAPE).astype(np.int16)
    store.write_case("case", Volume(image, AFFINE), LabelVolume((image > 110).astype(np.uint8), AFFINE))
    return store


def _label(store: OMEZarrStore, value: int = 1) -> LabelVolume:
    return LabelVolume(np.full((1, *SHAPE), value, np.uint8), AFFINE)


def test_a_version_saved_without_a_mask_is_fully_annotated(store):
    assert store.read_annotated("case") is None  # the ingested version
    number = store.save_label("case", _label(store), message="all reviewed")
    assert store.read_annotated("case", version=number) is None
    assert [v["annotated"] for v in store.label_versions("case")] == [False, False]


def test_the_annotated_mask_is_stored_per_version_and_read_back_lazily(store):
    slices = np.zeros(SHAPE, bool)
    slices[[3, 11]] = True  # two annotated slices
    first = store.save_label("case", _label(store, 2), annotated=slices)
    voxels = np.zeros(SHAPE, np.uint8)
    voxels[5:9, 10:30, 20:40] = 1  # a box of voxels, as uint8
    second = store.save_label("case", _label(store, 3), annotated=voxels)
    back = store.read_annotated("case", version=first)
    assert isinstance(back, zarr.Array) and back.shape == SHAPE and back.dtype == np.uint8
    np.testing.assert_array_equal(back[:], slices.astype(np.uint8))
    np.testing.assert_array_equal(store.read_annotated("case")[:], voxels)  # latest by default
    assert [v["annotated"] for v in store.label_versions("case")] == [False, True, True]
    assert store.read_annotated("case", version=1) is None and second == 3


def test_a_mask_with_a_channel_axis_is_accepted_and_all_ones_means_fully_annotated(store):
    mask = np.zeros((1, *SHAPE), bool)
    mask[0, 4] = True
    number = store.save_label("case", _label(store), annotated=mask)
    np.testing.assert_array_equal(store.read_annotated("case", version=number)[:], mask[0])
    full = store.save_label("case", _label(store), annotated=np.ones(SHAPE, bool))
    assert store.read_annotated("case", version=full) is None


def test_ngff_readers_see_the_label_levels_only(store):
    """The mask sits inside the version folder, beside the levels; the label's NGFF metadata is unchanged."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    mask = np.zeros(SHAPE, bool)
    mask[2] = True
    store.save_label("case", _label(store, 4), annotated=mask)
    datasets = store.root["case/labels/seg"].attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["v0002/0", "v0002/1"]
    nodes = list(Reader(parse_url(f"{store.url}/case/labels/seg"))())  # the label and, through its source, the image
    label_node = next(node for node in nodes if node.zarr.path.rstrip("/").endswith("labels/seg"))
    assert [np.asarray(level).shape for level in label_node.data] == [(1, *SHAPE), (1, 20, 36, 40)]
    assert int(np.asarray(label_node.data[0]).max()) == 4


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.zeros((20, 72, 79), bool), r"has shape \(20, 72, 79\), the label's voxels \(20, 72, 80\)"),
        (np.zeros((2, *SHAPE), bool), r"has shape \(2, 20, 72, 80\)"),
        (np.zeros(SHAPE, np.float32), "has dtype float32, not bool or integer"),
        (np.full(SHAPE, 2, np.uint8), "holds values 2..2, not only 0 and 1"),
    ],
)
def test_a_bad_mask_is_refused_with_the_fix_and_nothing_is_written(store, tmp_path, mask, match):
    with pytest.raises(StoreError, match=match) as info:
        store.save_label("case", _label(store), annotated=mask)
    assert info.value.fix and info.value.path.endswith("case/labels/seg")
    assert [v["version"] for v in store.label_versions("case")] == [1]
    assert not (tmp_path / "s.zarr" / "case" / "labels" / "seg" / "v0002").exists()


def test_a_recorded_mask_that_is_lost_is_an_error_not_full_annotation(store, tmp_path):
    import shutil

    mask = np.zeros(SHAPE, bool)
    mask[1] = True
    store.save_label("case", _label(store), annotated=mask)
    shutil.rmtree(tmp_path / "s.zarr" / "case" / "labels" / "seg" / "v0002" / "annotated")
    with pytest.raises(StoreError, match="records an annotated mask that is missing"):
        OMEZarrStore(store.url).read_annotated("case")
