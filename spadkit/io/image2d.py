"""Planar images (PNG, JPEG, TIFF) as one-slice volumes; multi-page TIFF as a stack."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tifffile
from PIL import Image

from spadkit.errors import InvalidImageError
from spadkit.io._guard import reading
from spadkit.volume import Volume, affine_from_spacing

#: Assumed pixel size (mm) when neither the caller nor the file gives one.
DEFAULT_PIXEL_MM = 1.0


def read_image2d(
    path: str | os.PathLike,
    *,
    spacing: Sequence[float] | None = None,
    modality: str | None = None,
) -> Volume:
    """Read a PNG/JPEG/TIFF into a :class:`Volume` of shape ``(C, 1, Y, X)``.

    Grey images give ``C = 1``, colour ``C = 3`` (alpha is dropped, palettes
    expanded). A multi-page greyscale TIFF gives ``(1, Z, Y, X)``.

    Args:
        path: the image file.
        spacing: pixel size ``(Y, X)`` (or ``(Z, Y, X)`` for a stack) in mm; by
            default the TIFF/ImageJ resolution tags when they give mm or um,
            else 1 mm (recorded as ``meta["spacing_assumed"] = True``).
        modality: e.g. ``"XR"``, ``"US"``.
    """
    path = str(path)
    lower = path.lower()
    if lower.endswith((".tif", ".tiff")):
        array, file_spacing = _read_tiff(path)
    else:
        array, file_spacing = _read_pil(path), None
    given = spacing if spacing is not None else file_spacing
    if given is None:
        zyx = (DEFAULT_PIXEL_MM,) * 3
    elif len(given) == 2:
        zyx = (DEFAULT_PIXEL_MM, *given)
    else:
        zyx = tuple(given)
    meta = {"source": path, "format": "tiff" if lower.endswith((".tif", ".tiff")) else "image2d", "spacing_assumed": given is None}
    return Volume(array, affine_from_spacing(zyx), modality=modality, meta=meta)


def _read_pil(path: str) -> np.ndarray:
    with reading(path, "not a readable image"), Image.open(path) as image:
        image.load()
        if image.mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGB")
        elif image.mode == "LA":
            image = image.convert("L")
        array = np.asarray(image)
    return _planar_to_czyx(array, path)


def _read_tiff(path: str) -> tuple[np.ndarray, tuple[float, ...] | None]:
    with reading(path, "not a readable TIFF"), tifffile.TiffFile(path) as tif:
        array = tif.asarray()
        spacing = _tiff_spacing_mm(tif, array)
    if array.ndim == 3 and array.shape[-1] not in (3, 4):  # page stack (Z, Y, X)
        return array[None], spacing
    return _planar_to_czyx(array, path), spacing


def _tiff_spacing_mm(tif: tifffile.TiffFile, array: np.ndarray) -> tuple[float, ...] | None:
    """Pixel size from the resolution tags (and ImageJ ``spacing`` for stacks), if in mm or um."""
    page = tif.pages[0]
    ij = tif.imagej_metadata or {}
    unit = str(ij.get("unit", "")).lower()
    scale = {"mm": 1.0, "millimeter": 1.0, "micron": 1e-3, "um": 1e-3, "\\u00b5m": 1e-3, "µm": 1e-3}.get(unit)
    if scale is None:
        res_unit = page.tags.get("ResolutionUnit")
        scale = {3: 10.0}.get(int(res_unit.value) if res_unit else 0)  # 3 = per centimetre
        if scale is None:
            return None
    xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
    if not xres or not yres:
        return None
    sx = scale * xres.value[1] / xres.value[0]
    sy = scale * yres.value[1] / yres.value[0]
    if array.ndim == 3 and array.shape[-1] not in (3, 4) and "spacing" in ij:
        return (float(ij["spacing"]) * scale, sy, sx)
    return (sy, sx)


def _planar_to_czyx(array: np.ndarray, path: str) -> np.ndarray:
    if array.ndim == 2:
        return array[None, None]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return array[..., :3].transpose(2, 0, 1)[:, None]
    raise InvalidImageError(f"unexpected image shape {array.shape}", path=path, fix="save it as a greyscale or RGB image.")
