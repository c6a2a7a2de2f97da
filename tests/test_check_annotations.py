"""``spadkit check`` reads every box set and image-class version and reports damaged ones by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from spadkit.check import check_store
from spadkit.io import OMEZarrStore
from tests.mni_ventricles import bounding_boxes, write_crop


@pytest.fixture
def store(tmp_path) -> OMEZarrStore:
    store = OMEZarrStore(str(tmp_path / "s.zarr"), mode="a")
    store.save_boxes("v0", *bounding_boxes(write_crop(store, "v0", shape=(32, 48, 40), origin=(70, 105, 75))))
    store.save_image_classes("v0", present=[1, 2])
    return store


def test_a_store_with_boxes_and_classes_checks_good(store):
    report = check_store(store.url)
    assert report.ok and report.good == ["v0"]


def test_a_lost_box_chunk_is_reported_with_its_set(store):
    for chunk in (Path(store.url) / "v0" / "boxes" / "boxes" / "v0001" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    report = check_store(store.url)
    assert not report.ok and "boxes/boxes" in report.problems["v0"] and "missing" in report.problems["v0"]


def test_boxes_edited_outside_the_image_are_reported(store):
    array = zarr.open_array(str(Path(store.url) / "v0" / "boxes" / "boxes" / "v0001"), mode="r+")
    rows = np.asarray(array[...])
    rows[0, 6] = 500.0  # x1 far outside the 40-voxel image
    array[...] = rows
    problem = check_store(store.url).problems["v0"]
    assert "outside the image" in problem and "version 1" in problem


def test_image_classes_edited_badly_are_reported(store):
    path = Path(store.url) / "v0" / "classes" / "classes" / "zarr.json"
    doc = json.loads(path.read_text())
    doc["attributes"]["spadkit"]["versions"][0]["absent"] = [2]  # now both present and absent
    path.write_text(json.dumps(doc))
    assert "both present and absent" in check_store(store.url).problems["v0"]
    del doc["attributes"]["spadkit"]["versions"][0]["absent"]
    path.write_text(json.dumps(doc))
    assert "lack their present/absent" in check_store(store.url).problems["v0"]
