"""NIfTI-1/2 (``.nii``, ``.nii.gz``) via nibabel, read lazily."""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import nibabel as nib
import numpy as np

from spadkit.atomic import atomic_path
from spadkit.errors import InvalidImageError
from spadkit.io._guard import GuardedArray, reading
from spadkit.io.budget import check_decoded_size
from spadkit.volume import Volume

#: Slices per Dask chunk when reading an uncompressed (memory-mappable) file.
_SLAB = 32


def read_nifti(path: str | os.PathLike, *, modality: str | None = None) -> Volume:
    """Read a NIfTI file into a lazy :class:`Volume` ``(C, Z, Y, X)``.

    The NIfTI array ``(X, Y, Z[, C])`` is transposed (not copied) and the affine
    is kept as is. A 4th axis of at most :data:`~spadkit.volume.MAX_CHANNELS`
    is read as channels (MSD multi-modal tasks); a 2D file becomes one slice.

    Raises:
        CorruptFileError: truncated or unreadable header or data (also on a later compute).
        InvalidImageError: 1D, 5D+ or time-series data, or non-positive spacing.
        DecodedSizeError: the header's shape exceeds the decoded-size budget
            (:mod:`spadkit.io.budget`); checked before any voxel is decoded.
    """
    path = str(path)
    with reading(path, "not a readable NIfTI header"):
        image = nib.load(path)
        proxy = image.dataobj
        shape = tuple(int(s) for s in proxy.shape)
        dtype = np.asarray(proxy[(slice(0, 1),) * len(shape)]).dtype  # scaled dtype; cheap even for .gz
    check_decoded_size(shape, dtype, path)  # before any chunk is decoded (a .nii.gz is one chunk)
    zooms = _raw_pixdim(path, image)[: min(len(shape), 3)]
    if any(z <= 0 for z in zooms):
        raise InvalidImageError(
            f"header pixdim gives non-positive spacing {tuple(float(z) for z in zooms)} mm (x, y, z)",
            path=path,
            fix="write the true voxel size into the header (nibabel: img.header.set_zooms) and save again.",
        )
    shape = _squeeze_singleton_time_axis(shape, path)
    compressed = path.endswith(".gz")
    chunks = shape if compressed else tuple(min(s, _SLAB) if i == 2 else s for i, s in enumerate(shape))
    if len(proxy.shape) == 5:  # (X, Y, Z, 1, C): index the singleton axis away

        def read(index: tuple) -> np.ndarray:
            return proxy[(*index[:3], 0, *index[3:])]

    else:
        read = proxy.__getitem__
    guarded = GuardedArray(read, shape, dtype, path)
    array = da.from_array(guarded, chunks=chunks, name=f"nifti-{os.path.abspath(path)}-{os.path.getmtime(path)}")
    if array.ndim == 2:
        array = array[:, :, None]
    order = (3, 2, 1, 0) if array.ndim == 4 else (2, 1, 0)
    return Volume(array.transpose(order), image.affine, modality=modality, meta={"source": path, "sources": [path], "format": "nifti"})


def _raw_pixdim(path: str, image: nib.Nifti1Image) -> tuple[float, ...]:
    """Voxel sizes as written in the file; nibabel's loader silently turns 0 or -2 mm into 1 or 2 mm."""
    with reading(path, "not a readable NIfTI header"), nib.openers.ImageOpener(path) as f:
        raw = type(image.header).from_fileobj(f, check=False)
    return tuple(float(v) for v in raw["pixdim"][1:4])


def _squeeze_singleton_time_axis(shape: tuple[int, ...], path: str) -> tuple[int, ...]:
    """(X, Y, Z, 1, C) -> (X, Y, Z, C), as written by some tools for vector images."""
    if len(shape) < 2:
        raise InvalidImageError(f"{len(shape)}D data of shape {shape}", path=path, fix="spadkit reads 2D images and 3D volumes.")
    if len(shape) == 5 and shape[3] == 1:
        return shape[:3] + shape[4:]
    if len(shape) > 4:
        raise InvalidImageError(
            f"{len(shape)}D data of shape {shape}",
            path=path,
            fix="split it into 3D volumes (nibabel.funcs.four_to_three) and read those.",
        )
    return shape


def write_nifti(volume: Volume, path: str | os.PathLike) -> Path:
    """Write a volume as NIfTI (``.nii`` or ``.nii.gz`` by suffix), atomically.

    The file appears complete or not at all: it is written beside the target,
    fsynced and renamed over it.
    """
    data = volume.numpy()
    data = data[0].transpose(2, 1, 0) if volume.num_channels == 1 else data.transpose(3, 2, 1, 0)
    image = nib.Nifti1Image(data, volume.affine)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return Path(path)
