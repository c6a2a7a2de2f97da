"""npe2 writer: a labels layer becomes a new label version in a spadkit store, or a NIfTI file.

``STORE.zarr`` (an existing spadkit store): the layer is saved with
:meth:`OMEZarrStore.save_label` as a new version (earlier versions stay). The
case is the one the layer was read from (``metadata["spadkit"]["case"]``), or
else the only case whose grid the layer lies on; the label name is the one it was
read as, or else the layer name (characters other than letters, digits, ``_ . -``
become ``_``).

``.nii`` / ``.nii.gz``: the layer on its grid in world RAS mm, in the original
orientation of the file it was read from when it came from one.

Either way the layer's geometry comes from its napari transform (see
:mod:`spadkit_napari._geometry`); a layer whose scale or position differs from
the image's grid is refused, and nothing is written.

Errors reach the user as :class:`LabelWriteError` (a ``RuntimeError`` whose
message is the spadkit error's, which stays attached as ``__cause__``): napari
swallows a ``ValueError`` raised by a writer, and every
:class:`~spadkit.errors.SpadkitError` is one, so the user would only read
"not a valid writer".
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from spadkit.errors import GeometryMismatchError, SpadkitError, UnsupportedFormatError
from spadkit.io import OMEZarrStore, write_nifti
from spadkit.volume import AFFINE_ATOL_MM, LabelVolume

from ._geometry import affine_of_layer

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NEW_LAYER_FIX = (
    "draw labels on the image's own grid: select the image layer and click 'New labels layer' "
    "(it copies the image's scale and position), or resample the label onto the image first."
)


class LabelWriteError(RuntimeError):
    """A labels layer was not saved; the message names the path and the fix."""


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one labels layer (napari's single-layer writer API); return the paths written.

    Args:
        path: ``STORE.zarr`` of an existing spadkit store, or a ``.nii``/``.nii.gz`` file.
        data: the layer's data ``(Z, Y, X)`` (a multiscale layer's finest level is used).
        meta: the layer's attributes (name, metadata, scale, translate, rotate, shear, affine).

    Raises:
        LabelWriteError: from :class:`~spadkit.errors.GeometryMismatchError` (the layer is
            not on the case's, or any case's, grid), :class:`~spadkit.errors.StoreError`
            (no spadkit store at ``path``, an invalid label name) or
            :class:`~spadkit.errors.UnsupportedFormatError` (neither ``.zarr`` nor NIfTI).
    """
    try:
        return _write(os.fspath(path), data, meta)
    except SpadkitError as err:
        raise LabelWriteError(str(err)) from err


def _write(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    info = dict(meta.get("metadata", {}).get("spadkit", {}))
    label = layer_label_volume(data, meta)
    if path.lower().endswith(NIFTI_SUFFIXES):
        if "orientation" in info:
            label = label.reoriented(tuple(info["orientation"]))
        return [str(write_nifti(label, path))]
    if path.rstrip("/").lower().endswith(".zarr"):
        return [_save_version(path, label, meta.get("name", "labels"), info)]
    raise UnsupportedFormatError("spadkit writes labels to .zarr stores and .nii/.nii.gz files", path=path, fix="save as STORE.zarr or NAME.nii.gz.")


def layer_label_volume(data: Any, meta: dict[str, Any]) -> LabelVolume:
    """The layer as a :class:`LabelVolume` ``(1, Z, Y, X)`` with its RAS affine from the layer transform."""
    array = np.asarray(data[0] if isinstance(data, list | tuple) else data)
    if array.ndim != 3:
        raise GeometryMismatchError(
            f"label layer {meta.get('name')!r} has {array.ndim} dimensions {array.shape}; spadkit saves 3D (Z, Y, X) label maps",
            fix=NEW_LAYER_FIX,
        )
    return LabelVolume(array, affine_of_layer(meta))


def _save_version(url: str, label: LabelVolume, layer_name: str, info: dict[str, Any]) -> str:
    OMEZarrStore(url)  # an existing spadkit store, or StoreError; mode "a" would create one
    store = OMEZarrStore(url, mode="a")
    case_id = info["case"] if info.get("case") and info["case"] in store else _case_on_grid(store, label, layer_name)
    name = info.get("label") or re.sub(r"[^A-Za-z0-9_.-]+", "_", layer_name).strip("_.-") or "labels"
    try:
        version = store.save_label(case_id, label, name, message=f"saved from napari layer {layer_name!r}")
    except GeometryMismatchError as err:
        raise GeometryMismatchError(
            f"label layer {layer_name!r} is not on the grid of case {case_id}: {err.reason}",
            path=f"{url.rstrip('/')}/{case_id}",
            fix=NEW_LAYER_FIX,
        ) from None
    return f"{url.rstrip('/')}/{case_id}/labels/{name}/v{version:04d}"


def _case_on_grid(store: OMEZarrStore, label: LabelVolume, layer_name: str) -> str:
    """The only case of ``store`` whose image grid (shape and affine) the label lies on."""
    matches = []
    for case_id in store.cases():
        attrs = store.case_attrs(case_id)
        if tuple(attrs["shape_czyx"][1:]) == label.spatial_shape and np.allclose(attrs["affine"], label.affine, atol=AFFINE_ATOL_MM):
            matches.append(case_id)
    if len(matches) == 1:
        return matches[0]
    sz, sy, sx = label.spacing
    where = f"label layer {layer_name!r} (shape (Z, Y, X) {label.spatial_shape}, spacing {sz:.4g} x {sy:.4g} x {sx:.4g} mm)"
    if matches:
        raise GeometryMismatchError(
            f"{where} lies on the grid of several cases ({', '.join(matches)})",
            path=store.url,
            fix="open the case from the store (File > Open: STORE.zarr/CASE) and save its label layer, which records the case.",
        )
    raise GeometryMismatchError(f"{where} lies on no case's image grid", path=store.url, fix=NEW_LAYER_FIX)
