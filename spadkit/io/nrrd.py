"""NRRD (``.nrrd``, ``.nhdr``) via pynrrd."""

from __future__ import annotations

import os

import nrrd
import numpy as np

from spadkit.errors import InvalidImageError
from spadkit.io._guard import reading
from spadkit.volume import Volume

#: World-space names NRRD uses, mapped to the sign flips that turn them into RAS.
_SPACE_TO_RAS = {
    "right-anterior-superior": (1, 1, 1),
    "ras": (1, 1, 1),
    "left-posterior-superior": (-1, -1, 1),
    "lps": (-1, -1, 1),
    "left-anterior-superior": (-1, 1, 1),
    "las": (-1, 1, 1),
    "scanner-xyz": (1, 1, 1),
    "3d-right-handed": (1, 1, 1),
}


def read_nrrd(path: str | os.PathLike, *, modality: str | None = None) -> Volume:
    """Read an NRRD file into a :class:`Volume` ``(C, Z, Y, X)``.

    Spatial axes are those with a ``space directions`` vector (or, without
    directions, all axes given ``spacings``); one remaining axis is channels.

    Raises:
        CorruptFileError: truncated or undecodable data.
        InvalidImageError: fewer than 2 or more than 3 spatial axes, non-positive spacing.
    """
    path = str(path)
    with reading(path, "not a readable NRRD file"):
        data, header = nrrd.read(path, index_order="F")  # axis order as listed in the header
    directions = header.get("space directions")
    if directions is not None:
        spatial = [i for i, d in enumerate(directions) if d is not None and not np.all(np.isnan(np.asarray(d, dtype=float)))]
        vectors = np.array([np.asarray(directions[i], dtype=float) for i in spatial])
    else:
        spacings = header.get("spacings")
        spatial = [i for i in range(data.ndim) if spacings is None or np.isfinite(spacings[i])]
        vectors = np.diag([float(spacings[i]) if spacings is not None else 1.0 for i in spatial])
    if not 2 <= len(spatial) <= 3 or data.ndim - len(spatial) > 1:
        raise InvalidImageError(
            f"{data.ndim}D data with {len(spatial)} spatial axes (shape {data.shape})",
            path=path,
            fix="spadkit reads 2D/3D images with at most one channel axis.",
        )
    channel_axes = [i for i in range(data.ndim) if i not in spatial]
    data = np.moveaxis(data, spatial + channel_axes, range(data.ndim))  # (x, y[, z][, c])
    if len(spatial) == 2:
        data = data[:, :, None, ...]
        vectors = np.vstack([np.pad(vectors, ((0, 0), (0, 3 - vectors.shape[1]))), [0.0, 0.0, 1.0]])
    if data.ndim == 3:
        data = data[..., None]
    affine = np.eye(4)
    affine[:3, :3] = vectors.T[:3]
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)[:3]
    space = str(header.get("space", "right-anterior-superior")).lower()
    if space not in _SPACE_TO_RAS:
        raise InvalidImageError(f"unsupported NRRD space {space!r}", path=path, fix=f"use one of {sorted(_SPACE_TO_RAS)}.")
    affine = np.diag([*_SPACE_TO_RAS[space], 1.0]) @ affine
    return Volume(data.transpose(3, 2, 1, 0), affine, modality=modality, meta={"source": path, "format": "nrrd"})
