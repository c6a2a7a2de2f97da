"""Boxes through crops, zooms, transpositions, flips and rotations: every map is affine on voxel edges.

Box rows are ``[class, z0, y0, x0, z1, y1, x1]`` in voxel *edges*, half-open
(voxel ``i`` spans ``[i, i + 1)``; MONAI's ``StandardMode`` with ``TO_REMOVE = 0``,
in array axes). On edges every step between the stored case and the delivered,
augmented patch is an affine map ``e -> M e``:

* a pyramid level divides by its factor, a crop subtracts its start, a transposition
  permutes, a zoomed crop (delivered voxel ``i`` samples the window at
  ``(i + 0.5) * zoom - 0.5``) divides by the zoom (:func:`crop_matrix`);
* a flip of an axis of ``n`` voxels maps ``e -> n - e`` (:func:`flip_matrix`);
* a rotation resampling ``u = c + T (v - c)`` about the patch centre (``c = n / 2`` in edges)
  maps a box corner ``u`` to ``c + T^-1 (u - c)`` (:func:`rotation_matrix`).

:func:`map_boxes` takes the axis-aligned box of the eight mapped corners (for the
axis-aligned maps that is the mapped box itself; under a rotation it grows, so
"outside every box of class c" stays true), clips it to the patch and drops boxes left
with no extent along an axis. A box that still touches the patch by any extent is kept,
so an exhaustive box set never calls a voxel of a boxed object "not c".

Written with numpy: MONAI's box utilities (``monai.apps.detection.transforms.box_ops``)
do the same for the axis-aligned maps, but importing them loads pandas, matplotlib,
scikit-image and zarr (17 to 33 s on the busy 2-core test machine), which the
augmentation, imported by every training task, must not; and a handful of boxes
maps ~10x faster in numpy than through torch's per-operation overhead.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

#: The eight corners of a box as column picks of a row ``[class, z0, y0, x0, z1, y1, x1]``.
_CORNERS = [[1 + axis + 3 * side for axis, side in enumerate(pick)] for pick in itertools.product((0, 1), repeat=3)]


def map_rows(rows: np.ndarray, matrix: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """Box rows ``(n, 7)`` mapped by the ``(4, 4)`` edge map ``matrix``, clipped to ``[0, patch)``; misses dropped.

    Returns:
        ``(m, 7)`` float32, ``m <= n``.
    """
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 7)
    moved = rows[:, _CORNERS] @ matrix[:3, :3].T + matrix[:3, 3]  # (n, 8, 3)
    size = np.asarray(patch, dtype=np.float64)
    low, high = np.clip(moved.min(axis=1), 0, size), np.clip(moved.max(axis=1), 0, size)
    keep = np.all(high > low, axis=1)
    return np.column_stack([rows[keep, :1], low[keep], high[keep]]).astype(np.float32)


def map_boxes(boxes: torch.Tensor, matrix: np.ndarray, patch: Sequence[int]) -> torch.Tensor:
    """:func:`map_rows` of a tensor of boxes, returned on its device."""
    return torch.from_numpy(map_rows(boxes.detach().cpu().numpy(), matrix, patch)).to(boxes.device)


def crop_matrix(start: Sequence[int], axes: Sequence[int], zoom: Sequence[float]) -> np.ndarray:
    """The edge map from stored voxels (read level, stored axes) to a delivered patch.

    Args:
        start: stored voxel ``(z, y, x)`` of the read window's corner.
        axes: patch axis ``i`` is stored axis ``axes[i]``.
        zoom: stored voxels per delivered voxel, per patch axis.
    """
    matrix = np.zeros((4, 4))
    matrix[3, 3] = 1.0
    for i, (axis, factor) in enumerate(zip(axes, zoom)):
        matrix[i, axis] = 1.0 / float(factor)
        matrix[i, 3] = -float(start[axis]) / float(factor)
    return matrix


def flip_matrix(axis: int, size: int) -> np.ndarray:
    """The edge map of a flip of array axis ``axis`` (0 = Z) of ``size`` voxels: ``e -> size - e``."""
    matrix = np.eye(4)
    matrix[axis, axis], matrix[axis, 3] = -1.0, float(size)
    return matrix


def rotation_matrix(transform: torch.Tensor | np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """The edge map of a rotation whose delivered voxel ``v`` samples ``u = c + T (v - c)`` (``T`` ``(3, 3)``,
    voxel units, array axes; :func:`~spadkit.data.augment.rotation_matrices` composed with the spacing)."""
    values = transform.detach().cpu().numpy() if isinstance(transform, torch.Tensor) else transform
    inverse = np.linalg.inv(np.asarray(values, dtype=np.float64))
    centre = np.asarray(patch, dtype=np.float64) / 2
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = inverse, centre - inverse @ centre
    return matrix
