"""Errors raised for bad user input.

Every error names the file (or catalog entry) it is about and says what to do,
so a message on its own is enough to fix the problem. All of them derive from
:class:`SpadkitError` and from :class:`ValueError`, so ``except ValueError``
in user code keeps working.
"""

from __future__ import annotations

import os


class SpadkitError(ValueError):
    """Base class: a problem with user input that the user can fix.

    Args:
        message: what is wrong.
        path: the file, folder or catalog entry concerned (shown first).
        fix: what the user should do about it (shown last).
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, fix: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.reason = message
        self.fix = fix
        parts = [f"{self.path}: {message}" if self.path else message]
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__("\n".join(parts))


class UnsupportedFormatError(SpadkitError):
    """The file type is not one spadkit can read."""


class CorruptFileError(SpadkitError):
    """The file is truncated or its content cannot be decoded."""


class InvalidImageError(SpadkitError):
    """The image decodes but is unusable (NaN/Inf, wrong dimensionality, bad spacing)."""


class GeometryMismatchError(SpadkitError):
    """A label map does not share its image's shape or affine."""


class CatalogError(SpadkitError):
    """A data-catalog entry is missing, malformed or unsafe."""


class StoreError(SpadkitError):
    """An OME-Zarr store is missing, incomplete or not written by spadkit."""
