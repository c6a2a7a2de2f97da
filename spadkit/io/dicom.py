"""DICOM: a series folder, a single slice, or a multi-frame file (pydicom).

Slices are sorted by their position along the slice normal, spacing comes from
``PixelSpacing`` and the distance between slice positions, and stored values
are mapped to real units (HU for CT) with ``RescaleSlope``/``RescaleIntercept``.
DICOM's patient space is LPS+; the affine is converted to spadkit's RAS+.

Images without patient geometry (no ``ImageOrientationPatient``) and
single-frame projection images (:data:`PROJECTION_MODALITIES`, whose
orientation is that of the detector, not of a slice) follow the convention of
PNG/JPEG images (:mod:`spadkit.io.image2d`): pixels as displayed, on an
axis-aligned RAS grid, so :meth:`Volume.canonical` does not move them and they
stay 2D. When ``PatientOrientation`` (0020,0020) is given (or, for projections,
the dominant directions of ``ImageOrientationPatient``), the pixels are first
flipped (or transposed) into the radiological display orientation: feet at the
bottom, the patient's left on the right of the image for frontal views
(``L\\F``), posterior on the right for lateral views (``P\\F``).

``MONOCHROME1`` pixels (white = low) are inverted to ``MONOCHROME2`` on read,
as SimpleITK/GDCM do (stored value ``v`` -> ``2**BitsStored - 1 - v``, or
``-1 - v`` when signed), and recorded as ``meta["monochrome1_inverted"]``.
Native pixel data longer than ``Rows x Columns x frames x samples`` are
refused as inconsistent rather than guessed at.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from spadkit.errors import CorruptFileError, InvalidImageError, UnsupportedFormatError
from spadkit.io._guard import TRUNCATED_FIX, reading
from spadkit.io.budget import check_decoded_size
from spadkit.volume import Volume, affine_from_spacing

#: LPS (DICOM) <-> RAS (spadkit) world coordinates.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Relative spread of slice gaps above which a series is reported as having missing slices.
SLICE_GAP_TOLERANCE = 0.05

_MODALITY_ALIASES = {"CR": "XR", "DX": "XR", "PET": "PT"}

#: Modalities whose single-frame images are projections (stored 2D even when they carry ImageOrientationPatient).
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RF", "XA", "IO", "PX", "RG", "DF"})

#: PatientOrientation letter -> (display axis: 0 = left to right, 1 = top to bottom; +1 if it already points the display way).
_DISPLAY_AXIS = {"L": (0, 1), "P": (0, 1), "R": (0, -1), "A": (0, -1), "F": (1, 1), "H": (1, -1)}


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True if the file carries the DICOM ``DICM`` marker at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_dicom(path: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read a DICOM series folder or a single (possibly multi-frame) file.

    Args:
        path: a folder holding one series (sub-folders are searched too), or one file.
        series_uid: which series to read when the folder holds several.

    Returns:
        Volume ``(C, Z, Y, X)`` in memory; C is 3 for colour images.

    Raises:
        CorruptFileError: a truncated file or undecodable pixel data.
        InvalidImageError: several series without ``series_uid``, duplicate or
            missing slices, inconsistent slice geometry.
    """
    path = Path(path)
    with reading(str(path), "unreadable DICOM header values"):  # e.g. a Rows of '1A'
        if path.is_dir():
            headers = _series_headers(path, series_uid)
            if len(headers) == 1:
                return _read_single_file(headers[0][0])
            return _read_series(headers, path)
        return _read_single_file(path)


# --------------------------------------------------------------------------- series


def _series_headers(folder: Path, series_uid: str | None) -> list[tuple[Path, Dataset]]:
    """Headers (no pixels) of the DICOM files of one series in ``folder``."""
    by_series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            with reading(str(file), "not a readable DICOM header"):
                header = pydicom.dcmread(file, stop_before_pixels=True)
        except (CorruptFileError, InvalidDicomError):
            if is_dicom_file(file):
                raise
            continue  # DICOMDIR-less folders often hold README/.txt files: skip non-DICOM files
        if "PixelData" in header or hasattr(header, "Rows"):
            by_series[str(header.get("SeriesInstanceUID", "unknown"))].append((file, header))
    if not by_series:
        raise InvalidImageError("no DICOM image files found", path=folder, fix="point at the folder that holds the .dcm files of one series.")
    if series_uid is not None:
        if series_uid not in by_series:
            raise InvalidImageError(f"series {series_uid} not in the folder", path=folder, fix=f"choose one of {sorted(by_series)}.")
        return by_series[series_uid]
    if len(by_series) > 1:
        listing = "; ".join(
            f"{uid} ({len(files)} files, {files[0][1].get('SeriesDescription', 'no description')})" for uid, files in sorted(by_series.items())
        )
        raise InvalidImageError(
            f"the folder holds {len(by_series)} series: {listing}",
            path=folder,
            fix="pass series_uid=... (CLI: --series-uid) or give each series its own folder.",
        )
    return next(iter(by_series.values()))


def _read_series(headers: list[tuple[Path, Dataset]], folder: Path) -> Volume:
    first = headers[0][1]
    row_dir, col_dir = _orientation_vectors(first, folder)
    normal = np.cross(row_dir, col_dir)
    positions = {file: np.asarray(h.ImagePositionPatient, dtype=float) for file, h in headers if "ImagePositionPatient" in h}
    if len(positions) != len(headers):
        raise InvalidImageError("some slices lack ImagePositionPatient", path=folder, fix="the series cannot be stacked in 3D; export it again with full headers.")
    ordered = sorted(headers, key=lambda fh: float(positions[fh[0]] @ normal))
    depths = np.array([positions[f] @ normal for f, _ in ordered])
    gaps = np.diff(depths)
    if np.any(gaps <= 1e-4):
        dup = [str(ordered[i][0].name) for i in np.flatnonzero(gaps <= 1e-4)[:3]]
        raise InvalidImageError(
            f"several slices share one position (e.g. {', '.join(dup)}): the folder mixes acquisitions",
            path=folder,
            fix="keep one acquisition (echo/phase/time point) per folder.",
        )
    if gaps.max() - gaps.min() > SLICE_GAP_TOLERANCE * np.median(gaps):
        raise InvalidImageError(
            f"uneven slice spacing from {gaps.min():.3g} to {gaps.max():.3g} mm: slices are missing or the series is irregular",
            path=folder,
            fix="check that the series is complete; irregular series must be resampled before use.",
        )
    rows, cols = int(first.get("Rows", 0)), int(first.get("Columns", 0))
    check_decoded_size((int(first.get("SamplesPerPixel", 1)), len(ordered), rows, cols), _output_dtype(first), folder)
    slices = [_pixels(file, _with_pixels(file)) for file, _ in ordered]
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise InvalidImageError(f"slices differ in size {sorted(shapes)}", path=folder, fix="keep one series per folder.")
    array = np.concatenate(slices, axis=1)  # each slice is (C, 1, Y, X)
    step = (positions[ordered[-1][0]] - positions[ordered[0][0]]) / (len(ordered) - 1)
    affine = _affine(first, row_dir, col_dir, step, positions[ordered[0][0]])
    meta = _meta(first, folder, len(ordered)) | {"sources": [str(f) for f, _ in ordered]}
    return Volume(array, affine, modality=_modality(first), meta=meta)


# --------------------------------------------------------------------------- single files


def _read_single_file(path: Path) -> Volume:
    header = _with_pixels(path)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    pixels = _pixels(path, header)  # (C, Z, Y, X)
    spacing_yx = _pixel_spacing(header)
    shared = _functional_group(header, "SharedFunctionalGroupsSequence")
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if "ImageOrientationPatient" not in header and (shared is None or "PlaneOrientationSequence" not in shared):
        return _read_as_projection(path, header, pixels, spacing_yx, _patient_orientation(header))
    row_dir, col_dir = _orientation_vectors(header, path)
    if frames == 1 and str(header.get("Modality", "")).upper() in PROJECTION_MODALITIES:
        return _read_as_projection(path, header, pixels, spacing_yx, (_direction_letter(row_dir), _direction_letter(col_dir)))
    normal = np.cross(row_dir, col_dir)
    positions = _frame_positions(header, per_frame, frames)
    offsets = header.get("GridFrameOffsetVector")  # RT dose: frame depths relative to the first
    if positions is not None and len(positions) == frames > 1:
        step = (positions[-1] - positions[0]) / (frames - 1)
        origin = positions[0]
    elif offsets is not None and frames > 1 and len(offsets) == frames:
        step = normal * (float(offsets[-1]) - float(offsets[0])) / (frames - 1)
        origin = positions[0] if positions is not None else np.zeros(3)
    else:
        step = normal * _slice_thickness(header)
        origin = positions[0] if positions is not None else np.zeros(3)
    affine = _affine(header, row_dir, col_dir, step, origin, spacing_yx)
    return Volume(pixels, affine, modality=_modality(header), meta=_meta(header, path, frames))


def _read_as_projection(
    path: Path, header: Dataset, pixels: np.ndarray, spacing_yx: tuple[float, float], letters: tuple[str, str] | None
) -> Volume:
    """A projection image: display orientation on an axis-aligned grid, like a PNG (stays 2D after canonical())."""
    meta = _meta(header, path, pixels.shape[1])
    if letters is not None:
        pixels, spacing_yx, letters = _to_display_orientation(letters, pixels, spacing_yx, path)
    if letters is not None:
        meta["patient_orientation"] = "\\".join(letters)
    affine = affine_from_spacing((_slice_thickness(header), *spacing_yx))
    return Volume(np.ascontiguousarray(pixels), affine, modality=_modality(header), meta=meta)


def _patient_orientation(ds: Dataset) -> tuple[str, str] | None:
    value = ds.get("PatientOrientation")
    return (str(value[0]), str(value[1])) if value and len(value) == 2 else None


def _direction_letter(lps: np.ndarray) -> str:
    """Patient direction letter of the dominant component of an LPS unit vector."""
    axis = int(np.argmax(np.abs(lps)))
    return ("LPH" if lps[axis] > 0 else "RAF")[axis]


def _to_display_orientation(
    letters: tuple[str, str], pixels: np.ndarray, spacing_yx: tuple[float, float], path: Path
) -> tuple[np.ndarray, tuple[float, float], tuple[str, str] | None]:
    """Flip/transpose ``(C, Z, Y, X)`` pixels whose rows/columns run along ``letters`` to read ``L\\F`` (or ``P\\F``).

    Returns the pixels, their ``(Y, X)`` spacing and the letters honoured
    (``None`` when they are not two in-plane directions; the pixels are then kept as stored).
    """
    row, col = (v.strip().upper()[:1] for v in letters)  # first letter of e.g. "LF" (oblique)
    if row not in _DISPLAY_AXIS or col not in _DISPLAY_AXIS or _DISPLAY_AXIS[row][0] == _DISPLAY_AXIS[col][0]:
        warnings.warn(f"{path}: PatientOrientation {list(letters)} is not a pair of in-plane directions; pixels kept as stored", stacklevel=4)
        return pixels, spacing_yx, None
    if _DISPLAY_AXIS[row][0] == 1:  # image rotated by 90 degrees: its rows run along the body axis
        pixels, spacing_yx, (row, col) = pixels.swapaxes(2, 3), spacing_yx[::-1], (col, row)
    if _DISPLAY_AXIS[row][1] < 0:
        pixels = pixels[..., ::-1]
    if _DISPLAY_AXIS[col][1] < 0:
        pixels = pixels[..., ::-1, :]
    return pixels, spacing_yx, letters


def _frame_positions(header: Dataset, per_frame: Sequence[Dataset] | None, frames: int) -> np.ndarray | None:
    if per_frame is not None and len(per_frame) == frames and all("PlanePositionSequence" in f for f in per_frame):
        return np.array([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in per_frame])
    if "ImagePositionPatient" in header:
        return np.array([[float(v) for v in header.ImagePositionPatient]])
    return None


# --------------------------------------------------------------------------- helpers


def _with_pixels(path: Path) -> Dataset:
    with reading(str(path), "not a readable DICOM file"):
        try:
            return pydicom.dcmread(path)
        except InvalidDicomError as err:
            raise CorruptFileError(
                f"not a DICOM Part 10 file ({err})",
                path=path,
                fix="export it again as a DICOM file (128-byte preamble and 'DICM' marker); a raw dataset can be "
                "converted with pydicom.dcmread(path, force=True).save_as(new_path, enforce_file_format=True).",
            ) from None


def _pixels(path: Path, ds: Dataset) -> np.ndarray:
    """Pixel data in real units as ``(C, Z, Y, X)``; Z is the frame count. MONOCHROME1 is inverted."""
    missing = [tag for tag in ("PixelData", "Rows", "Columns", "BitsAllocated") if ds.get(tag) is None]
    if missing:
        raise CorruptFileError(f"the image lacks {', '.join(missing)}", path=path, fix=TRUNCATED_FIX)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    check_decoded_size((samples, frames, int(ds.Rows), int(ds.Columns)), _output_dtype(ds), path)
    _check_native_length(ds, frames * samples * int(ds.Rows) * int(ds.Columns), path)
    with reading(str(path), "pixel data could not be decoded"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*excess padding", category=UserWarning)  # warned above, naming the file
        try:
            raw = ds.pixel_array
        except RuntimeError as err:  # pydicom: no installed decoder handles this transfer syntax
            syntax = ds.file_meta.get("TransferSyntaxUID")
            raise UnsupportedFormatError(
                f"pixel data in {getattr(syntax, 'name', syntax)} cannot be decoded here ({str(err).splitlines()[0]})",
                path=path,
                fix="install a pydicom decoder plugin for it (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, "
                "or python-gdcm), or convert the file to uncompressed DICOM (e.g. gdcmconv --raw).",
            ) from None
    if samples > 1:  # colour: (..., Y, X, S) -> (S, Z, Y, X)
        raw = raw.reshape((frames, *raw.shape[-3:])).transpose(3, 0, 1, 2)
    else:
        raw = raw.reshape((1, frames, *raw.shape[-2:]))
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        raw = np.invert(raw) if raw.dtype.kind == "i" else np.bitwise_and(np.invert(raw), (1 << int(ds.get("BitsStored", 8 * raw.itemsize))) - 1)
    slope, intercept = _rescale(ds)
    if slope == 1 and intercept == 0:
        return raw
    real = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if slope.is_integer() and intercept.is_integer() and real.min() >= -32768 and real.max() <= 32767:
        return real.astype(np.int16)  # CT in HU fits int16 exactly
    return real


def _rescale(ds: Dataset) -> tuple[float, float]:
    return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)


def _output_dtype(ds: Dataset) -> np.dtype:
    """The dtype :func:`_pixels` returns, for the size check (float32 once rescaled)."""
    if _rescale(ds) != (1.0, 0.0):
        return np.dtype(np.float32)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    itemsize = next((n for n in (1, 2, 4) if bits <= 8 * n), 8)  # pydicom's array dtype, e.g. 12 bits -> 2 bytes
    return np.dtype(f"{'i' if int(ds.get('PixelRepresentation', 0) or 0) else 'u'}{itemsize}")


def _check_native_length(ds: Dataset, samples_total: int, path: Path) -> None:
    """Refuse uncompressed pixel data holding a whole frame more than the header declares.

    Less than a frame of excess is trailing padding: pydicom drops it and spadkit
    warns. Compressed data are not checked (their length says nothing).
    """
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_compressed:
        return
    bits = int(ds.BitsAllocated)
    expected = -(-samples_total * bits // 8)
    excess = len(ds.PixelData) - expected - expected % 2  # one pad byte makes an odd length even
    frame_bytes = expected // int(ds.get("NumberOfFrames", 1) or 1)
    if excess >= frame_bytes:
        raise CorruptFileError(
            f"pixel data holds {len(ds.PixelData)} bytes, more than the {expected} that Rows x Columns x frames x samples "
            f"({ds.Rows} x {ds.Columns} x {ds.get('NumberOfFrames', 1) or 1} x {ds.get('SamplesPerPixel', 1)}) "
            f"at {bits} bits give",
            path=path,
            fix="the header and the pixel data disagree (wrong Rows/Columns/NumberOfFrames, or extra frames); "
            "export the image again or correct the header.",
        )
    if excess > 0:
        warnings.warn(f"{path}: {excess} bytes of padding after the pixel data are ignored", stacklevel=4)


def _functional_group(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _orientation_vectors(ds: Dataset, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Unit LPS directions of increasing column index (x) and increasing row index (y)."""
    iop = ds.get("ImageOrientationPatient")
    shared = _functional_group(ds, "SharedFunctionalGroupsSequence")
    if iop is None and shared is not None and "PlaneOrientationSequence" in shared:
        iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    if iop is None or len(iop) != 6:
        raise InvalidImageError("missing ImageOrientationPatient", path=path, fix="export the series with its geometry tags.")
    values = np.asarray(iop, dtype=float)
    row_dir, col_dir = values[:3], values[3:]
    if not (np.isclose(np.linalg.norm(row_dir), 1, atol=1e-3) and np.isclose(np.linalg.norm(col_dir), 1, atol=1e-3)):
        raise InvalidImageError(f"ImageOrientationPatient {values.tolist()} is not two unit vectors", path=path, fix="repair the header.")
    return row_dir, col_dir


def _slice_thickness(ds: Dataset) -> float:
    return float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """``(row spacing, column spacing)`` = ``(y, x)`` in mm; 1 mm when the file gives none."""
    return _pixel_spacing_tag(ds) or (1.0, 1.0)


def _pixel_spacing_tag(ds: Dataset) -> tuple[float, float] | None:
    shared = _functional_group(ds, "SharedFunctionalGroupsSequence")
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is None and shared is not None and "PixelMeasuresSequence" in shared:
        spacing = shared.PixelMeasuresSequence[0].get("PixelSpacing")
    return None if spacing is None else (float(spacing[0]), float(spacing[1]))


def _affine(
    ds: Dataset,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    slice_step: np.ndarray,
    origin: np.ndarray,
    spacing_yx: tuple[float, float] | None = None,
) -> np.ndarray:
    """RAS affine from LPS geometry; ``slice_step`` is the LPS offset between slices (mm)."""
    sy, sx = spacing_yx or _pixel_spacing(ds)
    if sy <= 0 or sx <= 0 or np.linalg.norm(slice_step) <= 0:
        raise InvalidImageError(
            f"non-positive spacing: pixel {(sy, sx)} mm, slice step {np.linalg.norm(slice_step):.4g} mm",
            path=ds.filename if hasattr(ds, "filename") else None,
            fix="repair PixelSpacing / slice positions in the headers.",
        )
    lps = np.eye(4)
    lps[:3, 0] = row_dir * sx
    lps[:3, 1] = col_dir * sy
    lps[:3, 2] = slice_step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def _modality(ds: Dataset) -> str | None:
    code = str(ds.get("Modality", "") or "").upper() or None
    return _MODALITY_ALIASES.get(code, code) if code else None


def _meta(ds: Dataset, source: Path, num_slices: int) -> dict:
    return {
        "source": str(source),
        "sources": [str(source)],
        "format": "dicom",
        "spacing_assumed": _pixel_spacing_tag(ds) is None,
        "monochrome1_inverted": str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1",
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "series_description": str(ds.get("SeriesDescription", "")),
        "num_slices": num_slices,
    }
