"""Readers and writers: every format becomes a :class:`~spadkit.volume.Volume` ``(C, Z, Y, X)``.

``read_volume(path)`` picks the reader from the file name (or folder content):

=================================  ==========================================
``.nii``, ``.nii.gz``               NIfTI (lazy, nibabel)
folder of DICOM files, ``.dcm``     DICOM series / single or multi-frame file
``.nrrd``, ``.nhdr``                NRRD (pynrrd)
``.png``, ``.jpg``, ``.jpeg``       2D image, one slice
``.tif``, ``.tiff``                 2D image or page stack (tifffile)
``STORE.zarr/CASE``                 a case of a spadkit OME-Zarr store (lazy)
=================================  ==========================================

Every reader checks the decoded size from the file's header against a budget
before decoding (:mod:`spadkit.io.budget`; ``SPADKIT_MAX_DECODED_BYTES``) and
lists the files it read in ``Volume.meta["sources"]``. A detached NRRD header
may only name a data file in its own folder (``allow_outside=True`` to override).

Box sets and image-level classes of a store's cases are :class:`Boxes` and
:class:`ImageClasses` (:mod:`spadkit.io.annotations`, with the annotation :data:`LEVELS`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spadkit.errors import UnsupportedFormatError
from spadkit.io.annotations import LEVELS, Boxes, ImageClasses
from spadkit.io.dicom import is_dicom_file, read_dicom
from spadkit.io.image2d import read_image2d
from spadkit.io.nifti import read_nifti, write_nifti
from spadkit.io.nrrd import read_nrrd
from spadkit.io.omezarr import OMEZarrStore
from spadkit.volume import LabelVolume, Volume

__all__ = [
    "LEVELS",
    "SUPPORTED_SUFFIXES",
    "Boxes",
    "ImageClasses",
    "OMEZarrStore",
    "detect_format",
    "read_label",
    "read_volume",
    "write_nifti",
]

_READERS: dict[str, Callable[..., Volume]] = {
    "nifti": read_nifti,
    "dicom": read_dicom,
    "nrrd": read_nrrd,
    "image2d": read_image2d,
}

SUPPORTED_SUFFIXES: dict[str, str] = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".dcm": "dicom",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".png": "image2d",
    ".jpg": "image2d",
    ".jpeg": "image2d",
    ".tif": "image2d",
    ".tiff": "image2d",
}


def detect_format(path: str | os.PathLike) -> str:
    """Name of the reader for ``path``: ``nifti``, ``dicom``, ``nrrd``, ``image2d`` or ``omezarr``.

    Raises:
        UnsupportedFormatError: the suffix is unknown and the content is not DICOM.
    """
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        if (path / "zarr.json").exists() and path.parent.joinpath("zarr.json").exists():
            return "omezarr"
        return "dicom"
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return SUPPORTED_SUFFIXES[suffix]
    if is_dicom_file(path):
        return "dicom"
    raise UnsupportedFormatError(
        "unknown file type",
        path=path,
        fix=f"spadkit reads {', '.join(sorted(SUPPORTED_SUFFIXES))}, DICOM folders and OME-Zarr cases; "
        "convert other formats (e.g. .mha/.mhd with SimpleITK) to NIfTI first.",
    )


def read_volume(path: str | os.PathLike, **options: Any) -> Volume:
    """Read any supported image into a :class:`Volume` ``(C, Z, Y, X)``.

    Args:
        path: file, DICOM folder, or ``STORE.zarr/CASE_ID``.
        **options: passed to the reader: ``modality=`` (NIfTI, NRRD, 2D), ``series_uid=``
            (DICOM), ``spacing=`` (2D), ``allow_outside=`` (NRRD: read a detached data
            file outside the header's folder; only for trusted headers).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SpadkitError: unreadable, unsafe or over-budget input (the message names the file and the fix).
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    fmt = detect_format(path)
    if fmt == "omezarr":
        store_path = Path(path)
        return OMEZarrStore(str(store_path.parent)).read_image(store_path.name, **options)
    return _READERS[fmt](path, **options)


def read_label(path: str | os.PathLike, classes: dict[int, str] | None = None, **options: Any) -> LabelVolume:
    """Read a label map (any format :func:`read_volume` reads, with its ``options``) as a :class:`LabelVolume`."""
    volume = read_volume(path, **options)
    return LabelVolume(volume.array, volume.affine, classes=classes, meta=volume.meta)
