"""The catalog says which annotation levels each dataset has: given, or derived from its tasks."""

from __future__ import annotations

import pytest

from spadkit.catalog import CatalogError, load_catalog, load_entry
from tests.test_catalog import VALID, _write


def _entry(tmp_path, **fields):
    text = VALID
    for key, value in fields.items():
        lines = [line for line in text.splitlines() if not line.startswith(f"{key}:")]
        text = "\n".join([*lines, f"{key}: {value}"]) + "\n"
    return load_entry(_write(tmp_path, "msd_spleen", text))


@pytest.mark.parametrize(
    ("task", "levels"),
    [
        ("[segmentation]", ("mask",)),
        ("[classification, detection]", ("box", "class")),
        ("[detection, segmentation, classification]", ("mask", "box", "class")),
        ("[regression]", ("none",)),
        ("[none]", ("none",)),
    ],
)
def test_levels_follow_the_tasks_when_not_given(tmp_path, task, levels):
    entry = _entry(tmp_path, task=task)
    assert entry.annotation_levels is None and entry.levels == levels


def test_given_levels_win_over_the_tasks_in_the_levels_order(tmp_path):
    entry = _entry(tmp_path, task="[segmentation, detection]", annotation_levels="[mask]")
    assert entry.levels == ("mask",)
    assert _entry(tmp_path, annotation_levels="[class, mask]").levels == ("mask", "class")


@pytest.mark.parametrize("bad", ["[mask, mask]", "[none, box]", "[points]", "[]", "mask"])
def test_bad_levels_are_refused_naming_the_field(tmp_path, bad):
    with pytest.raises(CatalogError, match="annotation_levels"):
        _entry(tmp_path, annotation_levels=bad)


def test_bundled_entries_with_boxes_and_image_labels_say_so():
    catalog = load_catalog()
    assert catalog["chestxray14"].levels == ("box", "class")  # 14 findings per image, 984 boxes on 880 images
    assert catalog["rsna_pneumonia"].levels == catalog["vindr_cxr"].levels == ("box", "class")
    assert catalog["deeplesion"].levels == ("box",) and catalog["busi"].levels == ("mask", "class")
    assert catalog["verse"].levels == ("mask",)  # its "detection" is vertebra centroids, not boxes
    assert catalog["ixi"].levels == ("none",) and catalog["msd_spleen"].levels == ("mask",)
    assert {e.name for e in catalog if "box" in e.levels} >= {"chestxray14", "deeplesion", "kvasir_seg", "luna16"}
