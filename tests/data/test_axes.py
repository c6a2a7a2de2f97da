"""Volumes whose thick slices lie along Y or X (sagittal/coronal stacks in a RAS store)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from spadkit.data import PatchStream
from spadkit.data.patches import coarse_axis_first
from spadkit.io import OMEZarrStore
from tests.data.conftest import StoreFixture, encoded, expected_window, write


@pytest.mark.parametrize(
    ("spacing", "shape", "axes"),
    [
        ((1.0, 1.0, 4.0), (40, 36, 10), (2, 0, 1)),  # sagittal: thick along X
        ((1.0, 3.0, 1.0), (40, 12, 36), (1, 0, 2)),  # coronal: thick along Y
        ((3.0, 1.0, 1.0), (12, 40, 36), (0, 1, 2)),  # axial: already first
        ((1.0, 1.0, 1.2), (40, 40, 40), (0, 1, 2)),  # nearly isotropic: left alone
        ((1.0, 0.5, 0.5), (1, 40, 40), (0, 1, 2)),  # 2D
    ],
)
def test_coarse_axis_first(spacing, shape, axes):
    assert coarse_axis_first(spacing, shape) == axes


@pytest.fixture(scope="module")
def sagittal_store() -> StoreFixture:
    url = f"memory://{uuid.uuid4().hex}.zarr"
    fixture = StoreFixture(url=url, cases={})
    write(OMEZarrStore(url, mode="a"), fixture, "sag", encoded((40, 36, 10)), (1.0, 1.0, 4.0), (-20.0, 5.0, 30.0))
    return fixture


def test_a_sagittal_stack_is_streamed_thick_axis_first(sagittal_store):
    stream = PatchStream([sagittal_store.url], patch_size=16, batch_size=1, samples_per_case=3, intensity="none", num_threads=0, rank=0, world_size=1)
    case = sagittal_store.cases["sag"]
    for batch in stream:
        assert batch["image"].shape[2:] == (4, 16, 16)  # 4 slices of 4 mm, 16 voxels of 1 mm in-plane
        assert batch["spacing"][0].tolist() == [4.0, 1.0, 1.0]
        assert batch["axes"][0].tolist() == [2, 0, 1]
        start = batch["start"][0].tolist()
        stored = expected_window(case.image, start, (16, 16, 4), [case.image.min()])
        np.testing.assert_array_equal(batch["image"][0].numpy(), stored.transpose(0, 3, 1, 2))
        affine = batch["affine"][0].numpy()
        for i, j, k in [(0, 0, 0), (3, 5, 7), (1, 15, 2)]:  # patch voxel (Z', Y', X') = stored (x, z, y) offsets
            world = affine @ [i, j, k, 1]  # array order
            stored_voxel = [start[2] + i, start[1] + k, start[0] + j, 1]  # stored (x, y, z)
            np.testing.assert_allclose(world, case.affine @ stored_voxel)


def test_coarse_axis_first_can_be_switched_off(sagittal_store):
    stream = PatchStream([sagittal_store.url], patch_size=16, batch_size=1, samples_per_case=1, intensity="none", num_threads=0, rank=0, world_size=1, coarse_axis_first=False)
    batch = next(iter(stream))
    assert batch["image"].shape[2:] == (16, 16, 4) and batch["axes"][0].tolist() == [0, 1, 2]
