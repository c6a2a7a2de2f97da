"""Where a delivered patch lies in the world, and how a zoomed crop becomes a fixed voxel grid.

A patch is read from the stored voxels of a case (``(Z, Y, X)`` of the store,
RAS), its axes may be permuted so the coarse axis comes first, and a token-grid
crop (:class:`~spadkit.data.PatchSize` with ``tokens``) covers ``zoom`` times
its voxels and is resampled to the fixed grid. :func:`patch_affine` tracks all
three, so the batch's ``affine`` maps the delivered voxels exactly.

Affine convention (MONAI's ``MetaTensor``): the columns of a batch affine follow
the array axes of ``batch["image"][b, c]``, i.e. ``world = A @ (i0, i1, i2, 1)``
for voxel ``[i0, i1, i2]`` (Z, Y, X). Stores and :class:`~spadkit.volume.Volume`
keep the NIfTI-style order (columns x, y, z = array axes 2, 1, 0);
:func:`spadkit.volume.array_order_affine` converts between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from spadkit.volume import array_order_affine

Shape3 = tuple[int, int, int]


def patch_affine(
    case_affine: np.ndarray | Sequence[Sequence[float]],
    start: Sequence[int],
    axes: Sequence[int] = (0, 1, 2),
    zoom: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Affine (MONAI convention, see the module docstring) of a delivered patch.

    Args:
        case_affine: the case's 4x4 affine, voxel ``(x, y, z)`` to RAS mm (store convention).
        start: stored ``(z, y, x)`` voxel of the read window's corner.
        axes: array axis ``i`` of the patch is stored axis ``axes[i]``.
        zoom: per array axis, stored voxels per delivered voxel (the window covers
            ``zoom * patch`` voxels; delivered voxel ``i`` samples the window at
            ``(i + 0.5) * zoom - 0.5``, the centre-aligned grid of trilinear resizing).

    Returns:
        ``(4, 4)`` float64.
    """
    stored = array_order_affine(np.asarray(case_affine, dtype=np.float64))
    out = np.eye(4)
    out[:3, 3] = stored[:3, :3] @ np.asarray(start, dtype=np.float64) + stored[:3, 3]
    for i, (axis, factor) in enumerate(zip(axes, zoom)):
        out[:3, i] = stored[:3, axis] * factor
        out[:3, 3] += stored[:3, axis] * (factor - 1) / 2
    return out


def zoomed_window(patch: Sequence[int], zoom: Sequence[float]) -> Shape3:
    """Voxels ``(Z, Y, X)`` a crop of ``patch`` delivered voxels covers at ``zoom`` (at least one)."""
    return tuple(max(1, round(n * z)) for n, z in zip(patch, zoom))


def margins(window: Sequence[int], patch: Sequence[int]) -> Shape3:
    """Voxels read beyond each side of a window before :func:`resample`: one where the axis is resampled."""
    return tuple(int(w != n) for w, n in zip(window, patch))


def resample(window: np.ndarray, shape: Sequence[int], covered: Sequence[int], *, labels: bool = False) -> torch.Tensor:
    """Resample a read window to the delivered grid, axis by axis.

    Along an axis where the ``covered`` voxels ``w`` and ``shape`` ``n`` differ, ``window``
    holds one extra voxel on each side (:func:`margins`) and delivered voxel ``i``
    samples the window at ``(i + 0.5) * w / n - 0.5`` (the centre-aligned grid
    :func:`patch_affine` describes), linearly for images and from the nearest
    voxel for labels; elsewhere it is copied. Linear interpolation of a linear
    ramp is exact, borders included (the margin holds real neighbours or padding).
    No anti-aliasing, as PUMIT's MONAI ``Affine``.

    Args:
        window: ``(C, z, y, x)`` read window including the margins.
        shape: delivered ``(Z, Y, X)``.
        covered: ``(Z, Y, X)`` voxels the crop covers (:func:`zoomed_window`), margins excluded.
        labels: nearest instead of linear.

    Returns:
        ``(C, *shape)`` tensor of the window's dtype (float32 for images).
    """
    out = torch.from_numpy(np.ascontiguousarray(window))
    # the most shrinking axis first, so later passes work on less data
    for axis in sorted(range(3), key=lambda a: shape[a] / covered[a]):
        n, width = shape[axis], covered[axis]
        if width == n:
            continue
        size = width + 2
        coords = 1 + (np.arange(n) + 0.5) * (width / n) - 0.5
        if labels:
            out = out.index_select(axis + 1, torch.from_numpy(np.floor(coords + 0.5).astype(np.int64)))
            continue
        low = np.clip(np.floor(coords).astype(np.int64), 0, size - 2)
        weight = torch.from_numpy(coords - low).to(out.dtype).reshape([n if d == axis + 1 else 1 for d in range(4)])
        below = out.index_select(axis + 1, torch.from_numpy(low))
        above = out.index_select(axis + 1, torch.from_numpy(low + 1))
        out = below.lerp_(above, weight)
    return out
