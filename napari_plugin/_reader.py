"""npe2 reader: NIfTI, NRRD, DICOM and spadkit OME-Zarr stores as napari layers at physical scale.

Every layer is placed by :func:`spadkit_napari._geometry.layer_transform`: mm
scale, the volume's origin, radiological display. What each source gives:

* ``STORE.zarr/CASE`` (or a store with a single case): the image as a lazy
  multiscale layer over the store's pyramid levels (Zarr-backed, read chunk by
  chunk as napari draws), contrast from the store's intensity statistics, and
  one visible, editable labels layer per label map (its latest version, read
  into memory), named ``"<label> v<version>"``.
* ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.dcm`` and DICOM folders: the
  image, reoriented to RAS (flips and axis swaps only) and read into memory.

Zarr groups not written by spadkit are left to napari-ome-zarr (the reader
returns None for them), as are folders without DICOM files to other readers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import dask.array as da
import fsspec

from spadkit.errors import StoreError
from spadkit.io import OMEZarrStore, read_volume
from spadkit.io.dicom import is_dicom_file
from spadkit.volume import LabelVolume, Volume

from ._geometry import layer_transform

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[str | list[str]], list[LayerData]]

#: File names this reader claims (directories: DICOM series and spadkit stores).
FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".dcm")
#: Files looked at to decide whether a folder holds a DICOM series.
DICOM_PROBE_FILES = 64


def napari_get_reader(path: str | list[str]) -> ReaderFunction | None:
    """The reader for ``path`` if spadkit should open it, else None (napari asks other plugins)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    path = os.fspath(path)
    location = spadkit_zarr(path)
    if location is not None:
        return partial(_read_store, *location)
    if path.lower().endswith(FILE_SUFFIXES) or (os.path.isdir(path) and _holds_dicom(path)):
        return _read_file
    return None


def spadkit_zarr(path: str) -> tuple[str, str | None] | None:
    """``(store_url, case_id)`` for a spadkit case, ``(store_url, None)`` for a store root, else None.

    Decided from the group's ``zarr.json`` alone (local path or fsspec URL): a case
    carries ``attributes.spadkit.affine``, a store root ``attributes.spadkit.store_format``.
    """
    url = path.rstrip("/")
    try:
        with fsspec.open(f"{url}/zarr.json", "rb") as f:
            attrs = json.load(f).get("attributes", {}).get("spadkit")
    except (OSError, ValueError, AttributeError, ImportError):  # missing, not JSON, not a dict, no fsspec backend
        return None
    if not isinstance(attrs, dict):
        return None
    if "affine" in attrs:
        parent, _, case_id = url.rpartition("/")
        return parent, case_id
    return (url, None) if "store_format" in attrs else None


def _holds_dicom(folder: str) -> bool:
    """True if one of the first :data:`DICOM_PROBE_FILES` files under ``folder`` is DICOM."""
    seen = 0
    for root, _, files in os.walk(folder):
        for name in files:
            if is_dicom_file(os.path.join(root, name)):
                return True
            seen += 1
            if seen >= DICOM_PROBE_FILES:
                return False
    return False


def _read_file(path: str | list[str]) -> list[LayerData]:
    path = path[0] if isinstance(path, list) else path
    volume = read_volume(path)
    name = os.path.basename(os.path.normpath(path))
    info = {"source": path, "orientation": volume.orientation}
    return [image_layer(volume.canonical().load(), name, info)]


def _read_store(url: str, case_id: str | None, path: str | list[str]) -> list[LayerData]:
    store = OMEZarrStore(url)
    if case_id is None:
        cases = store.cases()
        if len(cases) != 1:
            raise StoreError(
                f"the store holds {len(cases)} cases; napari opens one case at a time",
                path=url,
                fix=f"open STORE.zarr/CASE, e.g. {url.rstrip('/')}/{cases[0] if cases else 'CASE'} "
                f"(cases: {', '.join(cases[:10]) or 'none'}).",
            )
        case_id = cases[0]
    return case_layers(store, case_id)


def case_layers(store: OMEZarrStore, case_id: str) -> list[LayerData]:
    """The image (multiscale over the pyramid levels) and every label map (latest version) of a case."""
    info = {"store": store.url, "case": case_id}
    layers = [case_image_layer(store, case_id)]
    for name in store.label_names(case_id):
        label = store.read_label(case_id, name)
        version = label.meta["version"]
        layers.append(label_layer(label, f"{name} v{version}", {**info, "label": name, "version": version}))
    return layers


def case_image_layer(store: OMEZarrStore, case_id: str) -> LayerData:
    """The case's image as a lazy multiscale layer over its pyramid levels, named after the case."""
    attrs = store.case_attrs(case_id)
    levels = [da.from_zarr(store.read_image(case_id, level).array) for level in range(len(attrs["pyramid_factors_zyx"]))]
    info = {"store": store.url, "case": case_id}
    return image_layer(store.read_image(case_id), case_id, info, levels=levels, contrast=_contrast_limits(attrs))


def _contrast_limits(attrs: dict[str, Any]) -> list[list[float]] | None:
    """Per-channel ``[p0.5, p99.5]`` from the statistics ingest recorded: foreground ("body"), else all voxels.

    None when the case has no statistics or a channel's range is empty (napari then computes one).
    """
    limits = []
    for stats in attrs.get("intensity", []):
        spans = [(s.get("p0.5"), s.get("p99.5")) for s in (stats.get("body", {}), stats)]
        span = next(((float(lo), float(hi)) for lo, hi in spans if lo is not None and hi is not None and hi > lo), None)
        if span is None:
            return None
        limits.append(list(span))
    return limits or None


def image_layer(
    volume: Volume,
    name: str,
    info: dict[str, Any],
    *,
    levels: list[Any] | None = None,
    contrast: list[list[float]] | None = None,
) -> LayerData:
    """An image layer tuple: one channel as one layer, several channels split by ``channel_axis``.

    Args:
        volume: RAS-canonical image ``(C, Z, Y, X)``; its affine places the layer.
        name: layer name (channels get napari's ``" [c]"`` suffixes).
        info: stored as ``metadata["spadkit"]`` (source, store, case, original orientation).
        levels: the pyramid ``[(C, Z, Y, X), ...]``, finest first, for a multiscale layer;
            default ``[volume.array]``.
        contrast: per-channel ``[low, high]``; default: napari computes it.
    """
    levels = [volume.array] if levels is None else levels
    data = levels if len(levels) > 1 else levels[0]
    kwargs: dict[str, Any] = {"name": name, "metadata": {"spadkit": info}, "units": "mm", **layer_transform(volume.affine)}
    if volume.num_channels == 1:
        data = [level[0] for level in levels] if len(levels) > 1 else data[0]
        if contrast:
            kwargs["contrast_limits"] = contrast[0]
    else:
        kwargs["channel_axis"] = 0
        if contrast:
            kwargs["contrast_limits"] = contrast
    kwargs["multiscale"] = len(levels) > 1
    return data, kwargs, "image"


def label_layer(label: LabelVolume, name: str, info: dict[str, Any]) -> LayerData:
    """A visible labels layer tuple ``(Z, Y, X)`` placed like its image; class names as features."""
    kwargs: dict[str, Any] = {"name": name, "metadata": {"spadkit": info}, "units": "mm", **layer_transform(label.affine)}
    if label.classes:
        values = sorted(label.classes)
        kwargs["features"] = {"index": values, "class": [label.classes[v] for v in values]}
    return label.numpy()[0], kwargs, "labels"
