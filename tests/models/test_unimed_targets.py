"""UniMed's composed decoder: every annotation level (mask, box, image class, none) becomes one valid
discrete target with the right known/unknown pattern. Batches are built by hand in the form
``PatchStream(joint_classes=K)`` delivers (see /tmp/helpers/unimed_interface.md)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from spadkit.models.unimed import ABSENT, PRESENT, UNKNOWN, box_region, compose_targets

#: classes: 0 background, 1 and 2 two structures
K = 3
SHAPE = (4, 8, 8)


def unlabelled_batch(size: int, shape: Sequence[int] = SHAPE, image: torch.Tensor | None = None) -> dict:
    """A joint batch of ``size`` samples with no annotation (every key at its "unknown" value)."""
    return {
        "image": torch.rand(size, 1, *shape) if image is None else image,
        "spacing": torch.ones(size, 3, dtype=torch.float64),
        "label": torch.zeros(size, 1, *shape, dtype=torch.int64),
        "annotated": torch.zeros(size, 1, *shape, dtype=torch.bool),
        "boxes": [torch.zeros(0, 7) for _ in range(size)],
        "box_known": torch.zeros(size, K, dtype=torch.bool),
        "image_classes": torch.full((size, K), -1, dtype=torch.int8),
        "levels": [() for _ in range(size)],
    }


def add_mask(batch: dict, i: int, label: torch.Tensor, annotated: torch.Tensor) -> None:
    batch["label"][i, 0], batch["annotated"][i, 0] = label, annotated
    batch["levels"][i] += ("mask",)


def add_boxes(batch: dict, i: int, boxes: Sequence[Sequence[float]], exhaustive: Sequence[int]) -> None:
    """Boxes ``[class, z0, y0, x0, z1, y1, x1]`` (patch voxels); ``exhaustive``: classes every object of which is boxed."""
    batch["boxes"][i] = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 7)
    batch["box_known"][i, list(exhaustive)] = True
    batch["levels"][i] += ("box",)


def add_classes(batch: dict, i: int, present: Sequence[int], absent: Sequence[int]) -> None:
    batch["image_classes"][i, list(present)] = 1
    batch["image_classes"][i, list(absent)] = 0
    batch["levels"][i] += ("class",)


def _check_valid(targets, size: int) -> None:
    assert targets.presence.shape == (size, K) and targets.presence.dtype == torch.int8
    assert targets.voxels.shape == (size, K, *SHAPE) and targets.voxels.dtype == torch.int8
    assert set(targets.voxels.unique().tolist()) <= {UNKNOWN, ABSENT, PRESENT}
    fg = targets.voxels[:, 1:]
    assert ((fg == PRESENT).sum(1) <= 1).all()  # a voxel is of one class at most
    assert torch.equal(targets.voxels[:, 0] == PRESENT, (fg == ABSENT).all(1))  # background: nothing else there
    assert torch.equal(targets.voxels[:, 0] == ABSENT, (fg == PRESENT).any(1))

def test_a_mask_is_known_where_annotated_and_background_follows():
    batch = unlabelled_batch(2)
    label = torch.zeros(SHAPE, dtype=torch.int64)
    label[:, 2:5, 2:5] = 1
    partial = torch.zeros(SHAPE, dtype=torch.bool)
    partial[:2] = True  # two of four slices annotated
    add_mask(batch, 0, label, partial)
    add_mask(batch, 1, label, torch.ones(SHAPE, dtype=torch.bool))
    targets = compose_targets(batch, K)
    _check_valid(targets, 2)
    voxels = targets.voxels
    assert (voxels[0, :, 2:] == UNKNOWN).all() and (voxels[0, :, :2] >= 0).all()
    assert torch.equal(voxels[0, 1, :2], (label[:2] == 1).to(torch.int8))
    assert torch.equal(voxels[0, 0, :2], (label[:2] == 0).to(torch.int8))
    assert (voxels[0, 2, :2] == ABSENT).all()
    # presence in the patch: seen -> 1; unseen in a partly annotated patch -> unknown; fully annotated -> 0
    assert targets.presence[0].tolist() == [PRESENT, PRESENT, UNKNOWN]
    assert targets.presence[1].tolist() == [PRESENT, PRESENT, ABSENT]
    assert targets.bags == []


def test_an_exhaustive_box_set_makes_the_outside_known_free_of_its_class():
    batch = unlabelled_batch(2)
    add_boxes(batch, 0, [[2, 1.0, 2.5, 2.0, 3.0, 5.0, 4.2]], exhaustive=[2])  # class 2, fractional corners
    add_boxes(batch, 1, [[2, 1.0, 2.0, 2.0, 3.0, 5.0, 5.0]], exhaustive=[1, 2])
    targets = compose_targets(batch, K)
    _check_valid(targets, 2)
    inside = (slice(1, 3), slice(2, 5), slice(2, 5))  # rounded outwards
    assert box_region(batch["boxes"][0][0, 1:], SHAPE) == inside
    assert [(b.sample, b.label, b.region) for b in targets.bags] == [(0, 2, inside), (1, 2, inside)]
    v0, v1 = targets.voxels
    outside = torch.ones(SHAPE, dtype=torch.bool)
    outside[inside] = False
    assert (v0[2][inside] == UNKNOWN).all() and (v0[2][outside] == ABSENT).all()
    assert (v0[1] == UNKNOWN).all() and (v0[0] == UNKNOWN).all()  # class 1 not boxed: background unknown too
    assert (v1[1] == ABSENT).all()  # exhaustive for class 1 and no box of it: known free of 1
    assert (v1[0][outside] == PRESENT).all() and (v1[0][inside] == UNKNOWN).all()
    assert targets.presence.tolist() == [[UNKNOWN, UNKNOWN, PRESENT], [PRESENT, ABSENT, PRESENT]]


def test_a_box_outside_the_patch_or_of_an_unknown_class_makes_no_bag():
    batch = unlabelled_batch(1)
    add_boxes(batch, 0, [[1, 5.0, 0.0, 0.0, 7.0, 3.0, 3.0], [4, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0]], exhaustive=[])
    targets = compose_targets(batch, K)
    assert targets.bags == [] and (targets.voxels == UNKNOWN).all()


def test_image_classes_absent_is_known_everywhere_present_is_unknown_in_the_patch():
    batch = unlabelled_batch(2)
    add_classes(batch, 0, present=[2], absent=[1])
    add_classes(batch, 1, present=[], absent=[1, 2])
    targets = compose_targets(batch, K)
    _check_valid(targets, 2)
    v0, v1 = targets.voxels
    assert (v0[1] == ABSENT).all() and (v0[2] == UNKNOWN).all() and (v0[0] == UNKNOWN).all()
    assert (v1[1:] == ABSENT).all() and (v1[0] == PRESENT).all()  # nothing but background
    assert targets.presence.tolist() == [[UNKNOWN, ABSENT, UNKNOWN], [PRESENT, ABSENT, ABSENT]]


@pytest.mark.parametrize("keys", ["joint", "bare"])
def test_no_labels_means_nothing_known(keys):
    batch = unlabelled_batch(2)
    if keys == "bare":  # a batch of the plain stream: image and spacing only
        batch = {"image": batch["image"], "spacing": batch["spacing"]}
    targets = compose_targets(batch, K)
    _check_valid(targets, 2)
    assert (targets.voxels == UNKNOWN).all() and (targets.presence == UNKNOWN).all() and targets.bags == []


def test_levels_combine_and_the_mask_wins_where_they_disagree():
    batch = unlabelled_batch(1)
    label = torch.zeros(SHAPE, dtype=torch.int64)
    label[0, 0, 0] = 1  # a class-1 voxel the (wrong) class record calls absent
    annotated = torch.zeros(SHAPE, dtype=torch.bool)
    annotated[0] = True
    add_mask(batch, 0, label, annotated)
    add_classes(batch, 0, present=[], absent=[1])
    add_boxes(batch, 0, [[2, 2.0, 0.0, 0.0, 4.0, 4.0, 4.0]], exhaustive=[2])
    targets = compose_targets(batch, K)
    v = targets.voxels[0]
    assert v[1, 0, 0, 0] == PRESENT and (v[1, 1:] == ABSENT).all()
    assert (v[2, 0] == ABSENT).all() and (v[2, 2:, :4, :4] == UNKNOWN).all() and (v[2, 2:, 4:] == ABSENT).all()
    assert v[0, 0, 0, 0] == ABSENT and v[0, 0, 1, 1] == PRESENT
    assert targets.presence[0].tolist() == [PRESENT, PRESENT, PRESENT]
