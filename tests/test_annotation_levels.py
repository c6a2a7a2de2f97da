"""Boxes and image-level classes in the store: where they live, round trips, hostile input, interrupted saves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spadkit.data import LEVELS, Boxes, ImageClasses
from spadkit.errors import StoreError
from spadkit.io import OMEZarrStore
from spadkit.volume import LabelVolume
from tests.mni_ventricles import CROP_SHAPE, bounding_boxes, crop, write_crop


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A store with two real MNI152 crops: ``seg`` with the ventricle label map, ``plain`` with nothing."""
    url = tmp_path_factory.mktemp("annotations") / "template.zarr"
    store = OMEZarrStore(str(url), mode="a")
    write_crop(store, "seg", with_label=True)
    write_crop(store, "plain", origin=(60, 90, 60))
    return url


@pytest.fixture
def store(template, tmp_path) -> OMEZarrStore:
    """A fresh copy of the template store for each test."""
    shutil.copytree(template, tmp_path / "s.zarr")
    return OMEZarrStore(str(tmp_path / "s.zarr"), mode="a")


def test_boxes_round_trip_with_their_versions_and_levels(store):
    _, label = crop()
    corners, classes = bounding_boxes(label)
    assert len(corners) == 2 and store.annotation_levels("plain") == () and store.read_boxes("plain") is None
    assert store.save_boxes("plain", corners, classes, class_names={1: "ventricle_a", 2: "ventricle_b"}, author="ann") == 1
    boxes = OMEZarrStore(store.url).read_boxes("plain")
    assert isinstance(boxes, Boxes) and boxes.exhaustive and boxes.class_names == {1: "ventricle_a", 2: "ventricle_b"}
    np.testing.assert_array_equal(boxes.corners, corners)
    assert boxes.classes.dtype == np.int64 and boxes.classes.tolist() == [1, 2] and boxes.covered == (1, 2)
    np.testing.assert_array_equal(boxes.rows(), np.column_stack([classes, corners]))
    # a second version (one box, not exhaustive) becomes the default; the first stays readable
    assert store.save_boxes("plain", corners[:1] + 0.5, [1], exhaustive=False, message="moved") == 2
    latest = store.read_boxes("plain")
    assert not latest.exhaustive and latest.corners.tolist() == [(corners[0] + 0.5).tolist()] and latest.class_names is None
    np.testing.assert_array_equal(store.read_boxes("plain", version=1).corners, corners)
    versions = store.record_versions("plain", "boxes", "boxes")
    assert [(v["version"], v["author"], v["count"], v["message"]) for v in versions][:1] == [(1, "ann", 2, "")] and versions[1]["message"] == "moved"
    assert store.box_sets("plain") == ["boxes"] and store.annotation_levels("plain") == ("box",)
    with pytest.raises(StoreError, match="no version 7"):
        store.read_boxes("plain", version=7)


def test_every_level_is_reported_in_order(store):
    assert store.annotation_levels("seg") == ("mask",)
    store.save_image_classes("seg", present=[1, 2], absent=[3])
    store.save_boxes("seg", np.zeros((0, 6)), [], name="lesions", class_names={3: "lesion"})
    assert store.annotation_levels("seg") == LEVELS == ("mask", "box", "class")
    assert store.box_sets("seg") == ["lesions"] and store.image_class_sets("seg") == ["classes"]


def test_an_exhaustive_empty_set_covers_its_named_classes(store):
    store.save_boxes("plain", np.zeros((0, 6)), [], class_names={3: "lesion"})
    boxes = store.read_boxes("plain")
    assert len(boxes) == 0 and boxes.corners.shape == (0, 6) and boxes.rows().shape == (0, 7)
    assert boxes.exhaustive and boxes.covered == (3,)


def test_image_classes_round_trip(store):
    assert store.read_image_classes("plain") is None
    assert store.save_image_classes("plain", present=[2, 1, 2], absent=np.array([4, 3])) == 1
    assert OMEZarrStore(store.url).read_image_classes("plain") == ImageClasses(present=(1, 2), absent=(3, 4))
    store.save_image_classes("plain", present=[5])
    assert store.read_image_classes("plain") == ImageClasses(present=(5,), absent=())
    assert store.read_image_classes("plain", version=1).present == (1, 2)
    assert store.annotation_levels("plain") == ("class",)


def test_records_live_beside_labels_as_plain_zarr_that_ngff_readers_skip(store):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    corners, classes = bounding_boxes(crop()[1])
    store.save_boxes("seg", corners, classes)
    store.save_image_classes("seg", present=[1, 2])
    case = Path(store.url) / "seg"
    assert json.loads((case / "boxes" / "zarr.json").read_text())["attributes"]["spadkit"] == {"names": ["boxes"]}
    array = json.loads((case / "boxes" / "boxes" / "v0001" / "zarr.json").read_text())
    assert array["shape"] == [2, 7] and array["data_type"] == "float64" and array["dimension_names"] == ["box", "field"]
    entry = json.loads((case / "classes" / "classes" / "zarr.json").read_text())["attributes"]["spadkit"]["versions"][0]
    assert entry["present"] == [1, 2] and entry["absent"] == []
    nodes = list(Reader(parse_url(str(case)))())
    assert nodes[0].data[0].shape == (1, *CROP_SHAPE)  # the image, then its label: boxes/ and classes/ are no nodes
    assert [Path(node.zarr.path).relative_to(case).as_posix() for node in nodes[1:]] == ["labels", "labels/seg"]


BAD_BOXES = [
    (np.array([[0, 0, 0, 5, 5]]), [1], "shape"),
    (np.array([[0, 0, 0, 5, 5, 5]]), [0], "background"),
    (np.array([[0, 0, 0, 5, 5, 5]]), [-2], "background"),
    (np.array([[0, 0, 0, 5, 5, 5]]), [1.5], "whole numbers"),
    (np.array([[0, 0, 0, 5, 5, 5]]), [True], "whole numbers"),
    (np.array([[0, 0, 0, 5, 5, 5]]), [1, 2], "2 classes"),
    (np.array([[0, 0, np.nan, 5, 5, 5]]), [1], "NaN"),
    (np.array([[3, 0, 0, 3, 5, 5]]), [1], "empty along an axis"),
    (np.array([[0, 0, 0, 5, 5, CROP_SHAPE[2] + 1]]), [1], "outside the image"),
    (np.array([[-1, 0, 0, 5, 5, 5]]), [1], "outside the image"),
]


@pytest.mark.parametrize(("corners", "classes", "message"), BAD_BOXES)
def test_hostile_boxes_are_refused_and_change_nothing(store, corners, classes, message):
    store.save_boxes("plain", [[1, 1, 1, 2, 2, 2]], [1])
    before = sorted(p.relative_to(store.url) for p in Path(store.url).rglob("*") if ".spadkit" not in p.parts)
    with pytest.raises(StoreError, match=message) as caught:
        store.save_boxes("plain", corners, classes)
    assert caught.value.fix and "plain" in str(caught.value.path)
    after = sorted(p.relative_to(store.url) for p in Path(store.url).rglob("*") if ".spadkit" not in p.parts)
    assert after == before and store.read_boxes("plain").corners.tolist() == [[1, 1, 1, 2, 2, 2]]


@pytest.mark.parametrize(
    ("present", "absent", "message"),
    [([1], [1, 2], "both present and absent"), ([0], [], "background"), (["a"], [], "whole numbers"), ([[1, 2]], [], "shape")],
)
def test_hostile_image_classes_are_refused(store, present, absent, message):
    with pytest.raises(StoreError, match=message):
        store.save_image_classes("plain", present, absent)
    assert store.read_image_classes("plain") is None and store.annotation_levels("plain") == ()


@pytest.mark.parametrize("bad", ["", "..", "a/b", "labels", None])
def test_bad_names_and_cases_are_refused(store, bad):
    with pytest.raises(StoreError):
        store.save_boxes("plain", [[1, 1, 1, 2, 2, 2]], [1], name=bad)
    with pytest.raises(StoreError):
        store.save_image_classes("missing_case", [1])


def test_a_save_killed_before_its_metadata_keeps_the_old_boxes(store, monkeypatch):
    store.save_boxes("plain", [[1, 1, 1, 2, 2, 2]], [1])

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after the array, before the set's metadata switch

    monkeypatch.setattr(store._store, "make_durable", dies)
    with pytest.raises(KeyboardInterrupt):
        store.save_boxes("plain", [[3, 3, 3, 9, 9, 9]], [2])
    monkeypatch.undo()
    reopened = OMEZarrStore(store.url, mode="a")
    assert reopened.read_boxes("plain").corners.tolist() == [[1, 1, 1, 2, 2, 2]]
    assert [v["version"] for v in reopened.record_versions("plain", "boxes", "boxes")] == [1]
    # the orphaned folder is replaced by the next save
    assert reopened.save_boxes("plain", [[3, 3, 3, 9, 9, 9]], [2]) == 2
    assert reopened.read_boxes("plain").classes.tolist() == [2]


def test_a_first_save_killed_leaves_no_set(store, monkeypatch):
    monkeypatch.setattr(store._store, "make_durable", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        store.save_boxes("plain", [[1, 1, 1, 2, 2, 2]], [1])
    monkeypatch.undo()
    reopened = OMEZarrStore(store.url)
    assert reopened.read_boxes("plain") is None and reopened.annotation_levels("plain") == ()


def test_label_saves_and_box_saves_do_not_disturb_each_other(store):
    corners, classes = bounding_boxes(crop()[1])
    store.save_boxes("seg", corners, classes)
    label = store.read_label("seg")
    store.save_label("seg", LabelVolume(np.zeros(label.shape, np.int32), label.affine))
    np.testing.assert_array_equal(store.read_boxes("seg").corners, corners)
    assert [v["version"] for v in store.label_versions("seg")] == [1, 2]


def test_writers_at_once_get_distinct_versions_and_every_name_listed(store):
    from concurrent.futures import ThreadPoolExecutor

    def save(name: str) -> list[int]:
        writer = OMEZarrStore(store.url, mode="a")  # its own store object, as another process would have
        return [writer.save_boxes("plain", [[1, 1, 1, 2 + i, 2, 2]], [1], name=name) for i in range(3)]

    with ThreadPoolExecutor(3) as pool:
        numbers = list(pool.map(save, ["shared", "shared", "other"]))
    assert sorted(numbers[0] + numbers[1]) == [1, 2, 3, 4, 5, 6] and numbers[2] == [1, 2, 3]  # no version number twice
    assert sorted(store.box_sets("plain")) == ["other", "shared"]  # the set index lost neither name
    assert [v["version"] for v in store.record_versions("plain", "boxes", "shared")] == [1, 2, 3, 4, 5, 6]
