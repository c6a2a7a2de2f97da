"""Turn low-level decoding failures into :class:`~spadkit.errors.CorruptFileError`.

Running out of memory while decoding becomes a
:class:`~spadkit.io.budget.DecodedSizeError` that names the file and the budget.

Lazy readers hand Dask an array-like whose ``__getitem__`` reads from disk. A
truncated file then fails deep inside Dask, long after the reader returned; the
wrapper below makes that failure name the file and say what to do.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from nibabel.filebasedimages import ImageFileError
from nrrd import NRRDError

from spadkit.errors import CorruptFileError, SpadkitError
from spadkit.io.budget import out_of_memory

#: Exceptions that decoders raise on truncated or garbled input.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    EOFError, OSError, zlib.error, struct.error, ValueError, KeyError, IndexError, ImageFileError, NRRDError,
)

TRUNCATED_FIX = "the file is truncated or corrupt: download or export it again (compare its size or checksum with the source)."


@contextmanager
def reading(path: str, what: str = "could not be decoded") -> Iterator[None]:
    """Re-raise decoding errors inside the block as ``CorruptFileError`` (``DecodedSizeError`` for MemoryError)."""
    try:
        yield
    except SpadkitError:
        raise
    except MemoryError as err:
        raise out_of_memory(path, err) from None
    except DECODE_ERRORS as err:
        raise CorruptFileError(f"{what} ({type(err).__name__}: {err})", path=path, fix=TRUNCATED_FIX) from err


class GuardedArray:
    """Array-like over ``read(index)`` that reports decoding errors against ``path``.

    Args:
        read: function taking a NumPy index (tuple of slices) and returning the voxels.
        shape: full shape of the array.
        dtype: dtype of what ``read`` returns.
        path: the file, for error messages.
    """

    def __init__(self, read: Callable[[Any], np.ndarray], shape: tuple[int, ...], dtype: np.dtype, path: str):
        self._read = read
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype).newbyteorder("=")  # native byte order: big-endian files too
        self.ndim = len(self.shape)
        self.path = path

    def __getitem__(self, index: Any) -> np.ndarray:
        with reading(self.path, "failed while reading voxels"):
            return np.asarray(self._read(index), dtype=self.dtype)
