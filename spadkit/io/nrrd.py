"""NRRD (``.nrrd``, ``.nhdr``) via pynrrd.

Safety rules for hostile headers (see README "Safety and limits"):

* A detached header's ``data file`` must lie in the header's folder or below it,
  after resolving symbolic links; ``../secret.txt``, absolute paths and links
  pointing out of the folder are refused unless the caller passes
  ``allow_outside=True``. The file must be a regular file (not a device or pipe).
* Multi-file data (``data file: LIST`` or the ``fmt min max step`` form) is
  refused: pynrrd would read it as one literal file name.
* The decoded size is checked against the budget (:mod:`spadkit.io.budget`)
  from the header's sizes before reading, and compressed data is inflated no
  further than the header's size, so a small gzip stream cannot grow unbounded.

Every file read is listed in ``Volume.meta["sources"]`` (the header first).
"""

from __future__ import annotations

import bz2
import io
import os
import re
import zlib
from pathlib import Path
from typing import IO, Any

import nrrd
import numpy as np

from spadkit.errors import CorruptFileError, InvalidImageError, UnsupportedFormatError
from spadkit.io._guard import TRUNCATED_FIX, reading
from spadkit.io.budget import check_decoded_size, max_decoded_bytes
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

#: NumPy dtype of each NRRD type name (the spec's aliases), for the size check before reading.
_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t"), "int8"),
    **dict.fromkeys(("uchar", "unsigned char", "uint8", "uint8_t"), "uint8"),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "int16"),
    **dict.fromkeys(("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "uint16"),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t"), "int32"),
    **dict.fromkeys(("uint", "unsigned int", "uint32", "uint32_t"), "uint32"),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"), "int64"),
    **dict.fromkeys(("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "uint64"),
    "float": "float32",
    "double": "float64",
}

_DATA_FILE_KEYS = ("data file", "datafile")
_SKIP_KEYS = ("byte skip", "byteskip", "line skip", "lineskip")
_DECOMPRESSORS = {"gzip": lambda: zlib.decompressobj(zlib.MAX_WBITS | 16), "gz": lambda: zlib.decompressobj(zlib.MAX_WBITS | 16),
                  "bzip2": bz2.BZ2Decompressor, "bz2": bz2.BZ2Decompressor}


def read_nrrd(path: str | os.PathLike, *, modality: str | None = None, allow_outside: bool = False) -> Volume:
    """Read an NRRD file into a :class:`Volume` ``(C, Z, Y, X)``.

    Spatial axes are those with a ``space directions`` vector (or, without
    directions, all axes given ``spacings``); one remaining axis is channels.

    Args:
        path: an ``.nrrd`` file or a detached ``.nhdr`` header.
        modality: e.g. ``"CT"``.
        allow_outside: read a detached ``data file`` that lies outside the
            header's folder (only for headers you trust).

    Raises:
        CorruptFileError: truncated or undecodable data, a missing data file.
        InvalidImageError: a data file outside the header's folder, fewer than 2
            or more than 3 spatial axes, non-positive spacing.
        UnsupportedFormatError: multi-file (``LIST``/format-string) data.
        DecodedSizeError: the header's sizes exceed the decoded-size budget.
    """
    path = str(path)
    with reading(path, "not a readable NRRD file"), open(path, "rb") as fh:
        header = _read_header(fh, path)
        needed = _check_size(header, path)
        data_file = _data_file(header, path, allow_outside)
        data = _read_data(header, fh, data_file, needed, path)
    sources = [path] if data_file is None else [path, str(data_file)]
    return _to_volume(data, header, path, modality, sources)


def _read_header(fh: IO[bytes], path: str) -> dict[str, Any]:
    """The parsed header; ``fh`` is left at the first data byte."""
    try:
        return nrrd.read_header(fh)
    except (nrrd.NRRDError, ValueError):
        fh.seek(0)
        if re.search(rb"^data ?file:\s*LIST", fh.read(1 << 16), flags=re.MULTILINE | re.IGNORECASE):
            raise _multi_file_error("LIST", path) from None
        raise


def _multi_file_error(name: str, path: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(
        f"data file {name!r}: multi-file NRRD data (LIST or format string) is not supported",
        path=path,
        fix="join the pieces into one data file (e.g. `unu join` or SimpleITK) and point 'data file:' at it.",
    )


def _check_size(header: dict[str, Any], path: str) -> int:
    """Bytes the header's ``sizes`` and ``type`` declare, checked against the budget."""
    sizes = header.get("sizes")
    kind = str(header.get("type", "")).lower()
    if sizes is None or kind not in _TYPES:
        raise CorruptFileError(f"header lacks 'sizes' or has an unknown 'type' {kind!r}", path=path, fix=TRUNCATED_FIX)
    return check_decoded_size([int(s) for s in sizes], _TYPES[kind], path)


def _data_file(header: dict[str, Any], path: str, allow_outside: bool) -> Path | None:
    """The detached data file, resolved and checked; None when the data follow the header."""
    name = next((header[k] for k in _DATA_FILE_KEYS if k in header), None)
    if name is None:
        return None
    name = str(name).strip()
    words = name.split()
    if words[0].upper() == "LIST" or (len(words) >= 4 and "%" in words[0]):
        raise _multi_file_error(name, path)
    folder = Path(path).parent.resolve()
    target = (Path(path).parent / name).resolve()  # an absolute name replaces the folder
    if not allow_outside and not target.is_relative_to(folder):
        raise InvalidImageError(
            f"the header's data file {name!r} resolves to {target}, outside the header's folder {folder}",
            path=path,
            fix="refused for safety: a header may only name data beside it. Move the data file next to the header, "
            "or, if you trust this header, pass allow_outside=True to read_nrrd / read_volume.",
        )
    if not target.is_file():
        raise CorruptFileError(f"data file {name!r} ({target}) is missing or not a regular file", path=path, fix=TRUNCATED_FIX)
    return target


def _read_data(header: dict[str, Any], fh: IO[bytes], data_file: Path | None, needed: int, path: str) -> np.ndarray:
    """The data in the header's axis order; compressed data inflated to at most the header's size."""
    plain = {k: v for k, v in header.items() if k not in _DATA_FILE_KEYS}  # pynrrd must not open files itself
    encoding = str(header.get("encoding", "")).lower()
    source = open(data_file, "rb") if data_file is not None else fh  # noqa: SIM115 - closed below
    try:
        if encoding in _DECOMPRESSORS:
            for _ in range(int(header.get("line skip", header.get("lineskip", 0)))):
                source.readline()
            payload = _inflate(source.read(), encoding, header, needed, path)
            plain = {k: v for k, v in plain.items() if k not in _SKIP_KEYS} | {"encoding": "raw"}
            source = io.BytesIO(payload)
        return nrrd.read_data(plain, source, index_order="F")  # axis order as listed in the header
    finally:
        source.close()


def _inflate(compressed: bytes, encoding: str, header: dict[str, Any], needed: int, path: str) -> bytes:
    """Decompress ``needed`` bytes (plus ``byte skip``, counted in decompressed bytes as the NRRD spec says)."""
    skip = int(header.get("byte skip", header.get("byteskip", 0)))
    limit = needed + skip if skip >= 0 else max_decoded_bytes()  # skip -1: the data are the last bytes
    decompressor = _DECOMPRESSORS[encoding]()
    payload = decompressor.decompress(compressed, limit + 1)
    if len(payload) > limit:
        raise CorruptFileError(
            f"{encoding} data decompress to more than the {limit} bytes the header declares",
            path=path,
            fix="the sizes/type in the header do not match the data; export the file again.",
        )
    return payload[-needed:] if skip < 0 else payload[skip:]


def _to_volume(data: np.ndarray, header: dict[str, Any], path: str, modality: str | None, sources: list[str]) -> Volume:
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
    meta = {"source": path, "sources": sources, "format": "nrrd"}
    return Volume(data.transpose(3, 2, 1, 0), affine, modality=modality, meta=meta)
