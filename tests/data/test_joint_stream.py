"""Joint batches (``PatchStream(joint_classes=K)``): masks, boxes, image classes and unlabelled cases of
several stores in one batch, with boxes that land on their objects through crops, transpositions, zooms,
flips and rotations. Real data: MNI152 crops whose lateral ventricles are the boxed objects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spadkit.data import BatchAugment, DatasetSource, PatchSize, PatchStream
from spadkit.data.boxes import crop_matrix, flip_matrix, map_boxes, rotation_matrix
from spadkit.data.patches import box_start
from spadkit.errors import SpadkitError
from spadkit.io import OMEZarrStore
from tests.data.conftest import assert_batches_equal, expected_window
from tests.mni_ventricles import bounding_boxes, crop, write_crop

K = 4  # background, the two ventricles, and a class 3 ("lesion") known absent where listed
WEAK_ORIGIN = (60, 92, 60)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """Four stores of real MNI152 crops (48 x 80 x 72 voxels, 1 mm, one patch shape):

    * ``mask``: ``m0`` with the ventricle label map ``seg``;
    * ``weak``: ``b0`` with an exhaustive box set of both ventricles, ``c0`` with image classes (1, 2 present, 3 absent);
    * ``plain``: ``u0``, unlabelled;
    * ``both``: ``v0`` (1 mm) and ``t0`` (3 mm along X, so the stream transposes it) with label map and boxes.
    """
    root = tmp_path_factory.mktemp("joint")
    urls = {name: str(root / f"{name}.zarr") for name in ("mask", "weak", "plain", "both")}
    write_crop(OMEZarrStore(urls["mask"], mode="a"), "m0", with_label=True)
    weak = OMEZarrStore(urls["weak"], mode="a")
    weak.save_boxes("b0", *bounding_boxes(write_crop(weak, "b0", origin=WEAK_ORIGIN)), class_names={1: "ventricle_a", 2: "ventricle_b"})
    write_crop(weak, "c0", origin=(66, 98, 66))
    weak.save_image_classes("c0", present=[1, 2], absent=[3])
    write_crop(OMEZarrStore(urls["plain"], mode="a"), "u0", origin=(62, 94, 62))
    both = OMEZarrStore(urls["both"], mode="a")
    both.save_boxes("v0", *bounding_boxes(write_crop(both, "v0", with_label=True)))
    both.save_boxes("t0", *bounding_boxes(write_crop(both, "t0", spacing=(1.0, 1.0, 3.0), with_label=True)))
    return urls


def _mixed(stores, **kwargs) -> PatchStream:
    sources = [
        DatasetSource(stores["mask"], label="seg"),
        DatasetSource(stores["weak"], boxes="boxes", classes="classes"),
        DatasetSource(stores["plain"]),
    ]
    args = {"patch_size": 24, "batch_size": 4, "samples_per_case": 2, "num_threads": 0, "intensity": "none", "seed": 5, "rank": 0, "world_size": 1, "joint_classes": K}
    return PatchStream(sources, **{**args, **kwargs})


def _inside(label: np.ndarray, boxes: torch.Tensor, tolerance: float = 0.0) -> dict[int, float]:
    """Per class with voxels in ``label`` ``(Z, Y, X)``: the share of them whose centres lie in a box of that class
    (grown by ``tolerance`` voxels)."""
    shares = {}
    for value in (int(v) for v in np.unique(label) if v > 0):
        centres = np.argwhere(label == value) + 0.5
        rows = boxes[boxes[:, 0] == value, 1:].double().numpy()
        hit = np.zeros(len(centres), bool)
        for row in rows:
            hit |= np.all((centres >= row[:3] - tolerance) & (centres < row[3:] + tolerance), axis=1)
        shares[value] = float(hit.mean())
    return shares


def test_a_batch_mixes_every_level_and_store_with_each_samples_unknowns(stores):
    batches = list(_mixed(stores))
    assert batches
    seen = set()
    for batch in batches:
        b = len(batch["case_id"])
        assert b == 4 and len(set(batch["dataset"])) >= 2  # one batch key: the stores share batches
        assert batch["label"].shape == (b, 1, 24, 24, 24) and batch["label"].dtype == torch.int64
        assert batch["annotated"].shape == (b, 1, 24, 24, 24) and batch["annotated"].dtype == torch.bool
        assert batch["box_known"].shape == (b, K) and batch["box_known"].dtype == torch.bool
        assert batch["image_classes"].shape == (b, K) and batch["image_classes"].dtype == torch.int8
        assert len(batch["boxes"]) == len(batch["levels"]) == b
        for i, case in enumerate(batch["case_id"]):
            seen.add(case)
            boxes, known, classes, levels = batch["boxes"][i], batch["box_known"][i], batch["image_classes"][i], batch["levels"][i]
            assert boxes.dtype == torch.float32 and boxes.shape[1:] == (7,)
            annotated = batch["annotated"][i]
            expected = {"m0": ("mask",), "b0": ("box",), "c0": ("class",), "u0": ()}[case]
            assert levels == expected
            assert bool(annotated.all()) if case == "m0" else not annotated.any() and not batch["label"][i].any()
            assert known.tolist() == ([False, True, True, False] if case == "b0" else [False] * K)
            assert classes.tolist() == ([-1, 1, 1, 0] if case == "c0" else [-1] * K)
            if case != "b0":
                assert boxes.shape == (0, 7)
    assert seen == {"m0", "b0", "c0", "u0"}


def test_box_only_patches_get_boxes_that_land_on_the_ventricles(stores):
    _, truth = crop(WEAK_ORIGIN)  # what the box-only case's boxes were drawn from (not in its store)
    corners, classes = bounding_boxes(truth)
    hits = 0
    for batch in _mixed(stores, samples_per_case=6):
        for i in (i for i, case in enumerate(batch["case_id"]) if case == "b0"):
            start, boxes = np.asarray(batch["start"][i].tolist()), batch["boxes"][i]
            label = expected_window(truth[None], start, (24, 24, 24), [0])[0].astype(np.int64)
            assert {int(v) for v in np.unique(label) if v > 0} <= {int(c) for c in boxes[:, 0]}
            assert all(share == 1.0 for share in _inside(label, boxes).values())  # every ventricle voxel in view is boxed
            low, high = np.clip(corners[:, :3] - start, 0, 24), np.clip(corners[:, 3:] - start, 0, 24)
            overlapping = np.all(high > low, axis=1)
            expected = np.column_stack([classes, low, high])[overlapping]
            np.testing.assert_allclose(boxes.numpy(), expected)  # and each box is its ventricle's box, cut to the patch
            hits += bool(len(boxes))
    assert hits >= 3  # half of the box case's patches are drawn onto a box


@pytest.mark.parametrize(
    "patch", [PatchSize(voxels=20), PatchSize(tokens=2, multiple=8, zoom=(0.8, 1.6), zoom_prob=1.0)], ids=["voxels", "zoomed_tokens"]
)
def test_boxes_follow_zoom_and_transposition(stores, patch):
    stream = PatchStream([DatasetSource(stores["both"], label="seg", boxes="boxes")], patch, batch_size=2, samples_per_case=6, num_threads=0, seed=1, joint_classes=3, rank=0, world_size=1)
    checked = 0
    for batch in stream:
        for i, case in enumerate(batch["case_id"]):
            assert batch["levels"][i] == ("mask", "box")
            assert batch["axes"][i].tolist() == ([2, 0, 1] if case == "t0" else [0, 1, 2])
            label = batch["label"][i, 0].numpy()
            shares = _inside(label, batch["boxes"][i], tolerance=0.5 if patch.tokens else 0.0)
            assert all(share == 1.0 for share in shares.values()), (case, shares)
            checked += len(shares)
    assert checked >= 6


def test_flips_and_rotations_carry_the_boxes_with_their_voxels(stores):
    stream = PatchStream([DatasetSource(stores["both"], label="seg", boxes="boxes")], 20, batch_size=2, samples_per_case=4, num_threads=0, seed=2, joint_classes=3, rank=0, world_size=1)
    augment = BatchAugment(flip_prob=0.5, rotate_prob=1.0, rotate_range=math.pi / 3, gamma_prob=0.0, intensity_prob=0.0, seed=4)
    moved = 0
    for batch in stream:
        before = [b.clone() for b in batch["boxes"]]
        augment(batch)
        assert batch["augment"]["rotate"].abs().sum() > 0
        for i in range(len(batch["case_id"])):
            label = batch["label"][i, 0].numpy()
            # nearest-voxel resampling moves a voxel by up to half a voxel along each axis
            assert all(share == 1.0 for share in _inside(label, batch["boxes"][i], tolerance=0.9).values())
            if len(before[i]) and min(_inside(label, before[i], tolerance=0.9).values(), default=1.0) < 0.9:
                moved += 1  # the boxes before augmentation no longer hold the voxels: the check can fail
    assert moved >= 2


def test_edge_maps_match_hand_computed_boxes():
    boxes = torch.tensor([[1.0, 2, 3, 4, 5, 7, 9]])
    # crop at (1, 1, 1), transposed (X, Z, Y), zoom 2 along the new first axis
    np.testing.assert_allclose(map_boxes(boxes, crop_matrix((1, 1, 1), (2, 0, 1), (2.0, 1.0, 1.0)), (10, 10, 10))[0].tolist(), [1, 1.5, 1, 2, 4, 4, 6])
    np.testing.assert_allclose(map_boxes(boxes, flip_matrix(2, 10), (10, 10, 10))[0].tolist(), [1, 2, 3, 1, 5, 7, 6])
    quarter = torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # a quarter turn in the Y-X plane
    np.testing.assert_allclose(map_boxes(boxes, rotation_matrix(quarter, (10, 10, 10)), (10, 10, 10))[0].tolist(), [1, 2, 4, 3, 5, 9, 7])
    assert map_boxes(boxes, crop_matrix((0, 0, 20), (0, 1, 2), (1, 1, 1)), (10, 10, 10)).shape == (0, 7)  # misses the patch
    assert map_boxes(torch.zeros((0, 7)), flip_matrix(0, 4), (4, 4, 4)).shape == (0, 7)


def test_box_start_always_overlaps_the_box():
    rng = np.random.default_rng(0)
    box = np.array([[30.0, 40.5, 10.0, 34.0, 41.0, 60.0]])
    for _ in range(200):
        start = np.asarray(box_start((64, 80, 72), (8, 8, 8), box, rng))
        assert np.all(start < box[0, 3:]) and np.all(start + 8 > box[0, :3])


def test_the_same_batches_again_and_after_a_resume(stores):
    first = list(_mixed(stores))
    again = list(_mixed(stores))
    resumed = _mixed(stores)
    taken = _mixed(stores)
    iterator = iter(taken)
    next(iterator)
    resumed.load_state_dict(taken.state_dict())
    for a, b in zip(first, again):
        assert_batches_equal(a, b)
        assert all(torch.equal(x, y) for x, y in zip(a["boxes"], b["boxes"])) and torch.equal(a["image_classes"], b["image_classes"])
    later = next(iter(resumed))
    assert_batches_equal(later, first[1])
    assert all(torch.equal(x, y) for x, y in zip(later["boxes"], first[1]["boxes"]))
    assert resumed.settings_digest() != _mixed(stores, joint_classes=K + 1).settings_digest()


def test_without_joint_classes_streams_are_unchanged(stores):
    plain = PatchStream([DatasetSource(stores["mask"], label="seg")], 24, batch_size=1, samples_per_case=2, num_threads=0, rank=0, world_size=1)
    joint = PatchStream([DatasetSource(stores["mask"], label="seg")], 24, batch_size=1, samples_per_case=2, num_threads=0, rank=0, world_size=1, joint_classes=K)
    for a, b in zip(plain, joint):
        assert not {"boxes", "box_known", "image_classes"} & a.keys() and "levels" not in a
        for key in ("image", "label", "annotated", "start", "affine"):
            assert torch.equal(a[key], b[key]), key
    with pytest.raises(ValueError, match="joint_classes"):
        PatchStream([DatasetSource(stores["weak"], boxes="boxes")], 24, rank=0, world_size=1)
    with pytest.raises(ValueError, match="joint_classes"):
        _mixed(stores, joint_classes=1)


def test_a_class_beyond_joint_classes_is_refused_naming_the_case(stores):
    with pytest.raises(SpadkitError, match="c0.*class\\(es\\) \\[3\\]") as caught:
        _mixed(stores, joint_classes=3)
    assert "joint_classes=4" in caught.value.fix


def test_a_2d_slice_keeps_its_boxes_one_slice_deep_through_flips_and_rotations(tmp_path):
    store = OMEZarrStore(str(tmp_path / "slice.zarr"), mode="a")
    label = write_crop(store, "s0", origin=(88, 96, 64), shape=(1, 80, 72), with_label=True)  # an axial slice through both ventricles
    store.save_boxes("s0", *bounding_boxes(label))
    stream = PatchStream([DatasetSource(store.url, label="seg", boxes="boxes")], 32, batch_size=2, samples_per_case=4, num_threads=0, seed=3, joint_classes=3, rank=0, world_size=1)
    augment = BatchAugment(flip_prob=0.5, rotate_prob=1.0, gamma_prob=0.0, intensity_prob=0.0, seed=1)
    boxed = 0
    for batch in stream:
        assert batch["image"].shape[2] == 1
        augment(batch)
        for i, boxes in enumerate(batch["boxes"]):
            assert torch.all(boxes[:, 1] == 0) and torch.all(boxes[:, 4] == 1)
            assert all(share == 1.0 for share in _inside(batch["label"][i, 0].numpy(), boxes, tolerance=0.9).values())
            boxed += len(boxes)
    assert boxed >= 4
