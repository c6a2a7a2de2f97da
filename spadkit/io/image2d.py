"""Planar images (PNG, JPEG, TIFF) as one-slice volumes; multi-page TIFF as a stack.

Pixel axes are kept as they are: row 0 is the top of the image, column 0 its
left edge, and the affine is the axis-aligned RAS grid of :func:`affine_from_spacing`,
so :meth:`Volume.canonical` leaves the pixels where they are. DICOM images
without patient geometry follow the same convention (:mod:`spadkit.io.dicom`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
import tifffile
from PIL import Image

from spadkit.errors import InvalidImageError
from spadkit.io._guard import reading
from spadkit.io.budget import ENV_VAR, DecodedSizeError, check_decoded_size
from spadkit.volume import Volume, affine_from_spacing

#: Assumed pixel size (mm) when neither the caller nor the file gives one.
DEFAULT_PIXEL_MM = 1.0

#: Pillow modes converted on read (alpha dropped, palettes and other colour spaces to RGB).
_PIL_CONVERSIONS = {**dict.fromkeys(("P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"), "RGB"), "LA": "L"}

#: Resolution units of TIFF files, in mm per unit (3 = per centimetre); ImageJ ``unit`` names.
_TIFF_UNIT_MM = {3: 10.0}
_IMAGEJ_UNIT_MM = {"mm": 1.0, "millimeter": 1.0, "micron": 1e-3, "um": 1e-3, "\\u00b5m": 1e-3, "µm": 1e-3}


def read_image2d(
    path: str | os.PathLike,
    *,
    spacing: Sequence[float] | None = None,
    modality: str | None = None,
) -> Volume:
    """Read a PNG/JPEG/TIFF into a :class:`Volume` of shape ``(C, 1, Y, X)``.

    Grey images give ``C = 1``, colour ``C = 3`` (alpha is dropped, palettes
    expanded). A colour image whose three channels are identical (a grey
    radiograph saved as RGB) gives ``C = 1``, recorded as
    ``meta["channels_collapsed"] = True``. A multi-page greyscale TIFF gives
    ``(1, Z, Y, X)``.

    Args:
        path: the image file.
        spacing: pixel size ``(Y, X)`` (or ``(Z, Y, X)`` for a stack) in mm; by
            default the TIFF/ImageJ resolution tags when they give mm or um,
            else 1 mm, recorded as ``meta["spacing_assumed"] = True`` (also when
            a stack's slice spacing is unknown).
        modality: e.g. ``"XR"``, ``"US"``.

    Raises:
        CorruptFileError: truncated or undecodable file.
        DecodedSizeError: the image would exceed the decoded-size budget
            (:mod:`spadkit.io.budget`) or Pillow's decompression-bomb limit.
    """
    path = str(path)
    is_tiff = path.lower().endswith((".tif", ".tiff"))
    array, file_spacing = _read_tiff(path) if is_tiff else (_read_pil(path), None)
    array, collapsed = collapse_identical_channels(array)
    given = spacing if spacing is not None else file_spacing
    if given is None:
        zyx = (DEFAULT_PIXEL_MM,) * 3
    elif len(given) == 2:
        zyx = (DEFAULT_PIXEL_MM, *given)
    else:
        zyx = tuple(given)
    assumed = given is None or (len(given) == 2 and array.shape[1] > 1)  # a stack's slice spacing unknown
    meta = {
        "source": path,
        "sources": [path],
        "format": "tiff" if is_tiff else "image2d",
        "spacing_assumed": assumed,
        "channels_collapsed": collapsed,
    }
    return Volume(array, affine_from_spacing(zyx), modality=modality, meta=meta)


def collapse_identical_channels(array: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(3, Z, Y, X)`` with three equal channels -> ``(1, Z, Y, X)``; returns the array and whether it collapsed."""
    if array.shape[0] == 3 and np.array_equal(array[0], array[1]) and np.array_equal(array[0], array[2]):
        return array[:1], True
    return array, False


def _pil_layout(mode: str) -> tuple[int, np.dtype]:
    """``(channels, dtype)`` of ``np.asarray`` on a Pillow image of ``mode``."""
    probe = np.asarray(Image.new(mode, (1, 1)))
    return (probe.shape[-1] if probe.ndim == 3 else 1), probe.dtype


def _read_pil(path: str) -> np.ndarray:
    with reading(path, "not a readable image"), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # spadkit's own budget applies
        try:
            with Image.open(path) as image:
                target = _PIL_CONVERSIONS.get(image.mode, image.mode)
                for mode in {image.mode, target}:  # as decoded, then as converted
                    channels, dtype = _pil_layout(mode)
                    check_decoded_size((channels, image.height, image.width), dtype, path)
                image.load()
                array = np.asarray(image if target == image.mode else image.convert(target))
        except Image.DecompressionBombError as err:
            raise DecodedSizeError(
                f"Pillow refuses it as a decompression bomb ({err})",
                path=path,
                fix="if the image is genuine, raise Pillow's own limit in Python before reading "
                "(PIL.Image.MAX_IMAGE_PIXELS = None), or convert it to TIFF, which spadkit reads with tifffile "
                f"under its own budget ({ENV_VAR}).",
            ) from None
    return _planar_to_czyx(array, path)


def _read_tiff(path: str) -> tuple[np.ndarray, tuple[float, ...] | None]:
    with reading(path, "not a readable TIFF"), tifffile.TiffFile(path) as tif:
        series = tif.series[0]  # what asarray() reads
        check_decoded_size(series.shape, series.dtype, path)
        array = tif.asarray()
        spacing = _tiff_spacing_mm(tif, array, path)
    if array.ndim == 3 and array.shape[-1] not in (3, 4):  # page stack (Z, Y, X)
        return array[None], spacing
    return _planar_to_czyx(array, path), spacing


def _tiff_spacing_mm(tif: tifffile.TiffFile, array: np.ndarray, path: str) -> tuple[float, ...] | None:
    """Pixel size from the resolution tags (and ImageJ ``spacing`` for stacks), if in mm or um and usable."""
    page = tif.pages[0]
    ij = tif.imagej_metadata or {}
    scale = _IMAGEJ_UNIT_MM.get(str(ij.get("unit", "")).lower())
    if scale is None:
        res_unit = page.tags.get("ResolutionUnit")
        scale = _TIFF_UNIT_MM.get(int(res_unit.value) if res_unit else 0)
        if scale is None:
            return None
    sizes = [_pixel_size(page.tags.get(name), scale) for name in ("YResolution", "XResolution")]
    if None in sizes:
        warnings.warn(f"{path}: unusable TIFF resolution (zero, missing or not finite); assuming {DEFAULT_PIXEL_MM} mm pixels", stacklevel=3)
        return None
    if array.ndim == 3 and array.shape[-1] not in (3, 4) and "spacing" in ij:
        depth = float(ij["spacing"]) * scale
        if depth > 0 and math.isfinite(depth):
            return (depth, *sizes)
    return tuple(sizes)


def _pixel_size(tag: tifffile.TiffTag | None, mm_per_unit: float) -> float | None:
    """mm per pixel from an X/YResolution tag (pixels per unit, a rational); None when unusable."""
    if tag is None:
        return None
    numerator, denominator = tag.value
    if numerator <= 0 or denominator <= 0:
        return None
    size = mm_per_unit * denominator / numerator
    return size if math.isfinite(size) else None


def _planar_to_czyx(array: np.ndarray, path: str) -> np.ndarray:
    if array.ndim == 2:
        return array[None, None]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return array[..., :3].transpose(2, 0, 1)[:, None]
    raise InvalidImageError(f"unexpected image shape {array.shape}", path=path, fix="save it as a greyscale or RGB image.")
