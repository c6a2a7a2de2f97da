"""Layer transforms: an oblique RAS affine survives napari's composition both ways."""

from __future__ import annotations

import numpy as np
import pytest
from napari.layers import Labels
from spadkit_napari._geometry import affine_of_layer, layer_transform

from spadkit.volume import Volume


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation about world axis ``axis`` (0 x, 1 y, 2 z)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[[i, i, j, j], [i, j, i, j]] = c, -s, s, c
    return matrix


def test_an_oblique_affine_goes_through_a_napari_layer_and_back():
    affine = np.eye(4)
    affine[:3, :3] = rotation(0, 8) @ rotation(1, -5) @ rotation(2, 12) @ np.diag([0.7, 0.8, 2.5])
    affine[:3, 3] = (-90.0, 20.0, 35.5)
    assert Volume(np.zeros((1, 4, 5, 6)), affine).orientation == "RAS"  # canonical, yet oblique
    with pytest.warns(UserWarning, match="Non-orthogonal slicing"):  # napari draws out-of-slice tilt flat
        layer = Labels(np.zeros((6, 5, 4), np.uint8), **layer_transform(affine))
    np.testing.assert_allclose(affine_of_layer(layer._get_state()), affine, atol=1e-9)
    # napari's world point of voxel (z, y, x) is the negated RAS point (-S, -A, -R) in mm
    voxel = np.array([3.0, 1.0, 2.0])
    ras = affine @ np.r_[voxel[::-1], 1.0]
    np.testing.assert_allclose(layer.data_to_world(voxel), -ras[2::-1], atol=1e-9)
