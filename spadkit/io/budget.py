"""Decoded-size budget: refuse images whose voxels would not fit, before decoding them.

A few kilobytes of compressed data can claim gigabytes of voxels (a gzipped
NIfTI of zeros, a PNG of one colour, a tiled TIFF). Every reader computes the
size of the array it is about to allocate from the file's *header* and calls
:func:`check_decoded_size` first, so such a file fails at once with a message
that names it and says how to raise the limit.

The limit, in bytes, is taken from (first found):

1. :func:`set_max_decoded_bytes` (Python), e.g. ``set_max_decoded_bytes("32G")``;
2. the environment variable ``SPADKIT_MAX_DECODED_BYTES`` (``"34359738368"``, ``"32G"``, ``"512M"``);
3. the default, :func:`default_max_decoded_bytes`: a quarter of the machine's
   memory (or of the container's cgroup limit), at most 16 GiB. Ingest holds
   about three copies of a case while reorienting and writing it, so a quarter
   of memory is the largest case it can take without swapping; the 16 GiB cap
   keeps one small hostile file from claiming a large shared server.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spadkit.errors import InvalidImageError, SpadkitError

#: Environment variable holding the budget in bytes (suffixes K, M, G, T are powers of 1024).
ENV_VAR = "SPADKIT_MAX_DECODED_BYTES"

#: Upper bound of the default budget.
DEFAULT_CAP_BYTES = 16 * 1024**3

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_setting: int | None = None


class DecodedSizeError(InvalidImageError):
    """The image would decode to more bytes than the budget allows (or memory ran out while decoding)."""


def parse_bytes(value: str | int, what: str = ENV_VAR) -> int:
    """``"16G"`` -> 17179869184; plain integers are bytes.

    Raises:
        SpadkitError: not a positive size.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(value), flags=re.IGNORECASE)
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()]) if match else 0
    if size <= 0:
        raise SpadkitError(
            f"{what}={value!r} is not a size in bytes",
            fix=f"give a positive number of bytes, optionally with a K/M/G/T suffix, e.g. {what}=32G.",
        )
    return size


def set_max_decoded_bytes(value: str | int | None) -> None:
    """Set the budget for this process (bytes or ``"32G"``); ``None`` returns to the env var / default."""
    global _setting
    _setting = None if value is None else parse_bytes(value, "max_decoded_bytes")


def _memory_bytes() -> int:
    """Physical memory, or the cgroup v2 limit of this container when lower (4 x the cap where unknown)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return 4 * DEFAULT_CAP_BYTES
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def default_max_decoded_bytes() -> int:
    """A quarter of memory, at most :data:`DEFAULT_CAP_BYTES`."""
    return min(DEFAULT_CAP_BYTES, _memory_bytes() // 4)


def max_decoded_bytes() -> int:
    """The budget in force: the Python setting, else ``SPADKIT_MAX_DECODED_BYTES``, else the default."""
    if _setting is not None:
        return _setting
    env = os.environ.get(ENV_VAR)
    return parse_bytes(env) if env else default_max_decoded_bytes()


def format_bytes(size: float) -> str:
    """``17179869184`` -> ``"16 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.3g} {unit}"
        size /= 1024
    return f"{size:.3g} TiB"


def raise_limit_fix(needed: int | None = None) -> str:
    """How to raise the budget (the ``fix`` of every budget error)."""
    suggestion = f"{-(-needed // 1024**3) + 1}G" if needed else "32G"
    return (
        f"if the image is genuine and fits in memory, raise the limit: set {ENV_VAR}={suggestion} "
        f"(or call spadkit.io.budget.set_max_decoded_bytes('{suggestion}')); otherwise leave the file out."
    )


def check_decoded_size(shape: Sequence[int], dtype: np.dtype | type | str, path: str | os.PathLike | None) -> int:
    """Raise unless an array of ``shape`` and ``dtype`` fits the budget; return its size in bytes.

    Call it with the shape and dtype read from the file's header, before decoding
    or allocating anything.

    Raises:
        DecodedSizeError: the array would exceed :func:`max_decoded_bytes`, or the
            header gives a negative size.
    """
    dims = [int(s) for s in shape]
    if any(d < 0 for d in dims):
        raise DecodedSizeError(f"the header gives a negative size {tuple(dims)}", path=path, fix="the file is corrupt; export it again.")
    needed = int(np.prod(dims, dtype=object)) * np.dtype(dtype).itemsize  # Python ints: no overflow
    limit = max_decoded_bytes()
    if needed > limit:
        raise DecodedSizeError(
            f"the header claims {'x'.join(map(str, dims))} voxels of {np.dtype(dtype).name}, "
            f"{format_bytes(needed)} decoded, above the {format_bytes(limit)} budget "
            "(refused before decoding; small compressed files can claim huge images)",
            path=path,
            fix=raise_limit_fix(needed),
        )
    return needed


def out_of_memory(path: str | os.PathLike | None, err: MemoryError) -> DecodedSizeError:
    """The error to raise when memory ran out while decoding ``path`` anyway."""
    return DecodedSizeError(
        f"ran out of memory while decoding ({type(err).__name__}: {err or 'no details'}); "
        f"the decoded-size budget is {format_bytes(max_decoded_bytes())}",
        path=path,
        fix=f"free memory or use fewer ingest workers; to refuse such files before decoding, lower {ENV_VAR} "
        "(e.g. to a quarter of free memory).",
    )
