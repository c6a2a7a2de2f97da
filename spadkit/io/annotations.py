"""Annotation levels weaker than a label map: bounding boxes and image-level classes.

A case of a store may carry annotations of three levels (:data:`LEVELS`), any
subset of them; a case with none is unlabelled:

* ``"mask"``: a voxel label map (``OMEZarrStore.save_label``), possibly partial;
* ``"box"``: axis-aligned boxes, each with a class (:class:`Boxes`);
* ``"class"``: classes known present or absent in the whole case (:class:`ImageClasses`).

Class values are shared by all levels: ``0`` is background, ``1..K-1`` the
classes, so one model can learn from every level at once (UniMed's composed
targets). This module holds the plain records and the checks of user input;
where the store keeps them is :mod:`spadkit.io.omezarr`'s business.

Box coordinates are level-0 voxel *edges* in the store's array order:
``(z0, y0, x0, z1, y1, x1)``, half-open, so voxel ``i`` spans ``[i, i + 1)`` and
a box ``[2, 5)`` covers voxels 2, 3 and 4 (MONAI's ``StandardMode`` with
``TO_REMOVE = 0``, in array axes). Coordinates may be fractional (boxes drawn on a
finer grid, or mapped from world coordinates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spadkit.errors import StoreError

#: The annotation levels, from the strongest: a label map, boxes, image-level classes.
LEVELS = ("mask", "box", "class")


@dataclass(frozen=True, eq=False)
class Boxes:
    """One set of boxes of a case.

    Attributes:
        corners: ``(N, 6)`` float64 level-0 voxel edges ``(z0, y0, x0, z1, y1, x1)``, half-open.
        classes: ``(N,)`` int64 class of each box, ``>= 1``.
        exhaustive: every object of the :attr:`covered` classes in the case is boxed, so a voxel
            outside all boxes of such a class is known not to be of it.
        class_names: class value -> name, or None.
    """

    corners: np.ndarray
    classes: np.ndarray
    exhaustive: bool = True
    class_names: dict[int, str] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def covered(self) -> tuple[int, ...]:
        """The classes the set speaks for: the keys of :attr:`class_names` where given (so an
        exhaustive *empty* set says "none of these anywhere"), else the classes of its boxes."""
        values = self.class_names.keys() if self.class_names else self.classes.tolist()
        return tuple(sorted({int(v) for v in values}))

    def rows(self) -> np.ndarray:
        """``(N, 7)`` float64 ``[class, z0, y0, x0, z1, y1, x1]`` (the stream's box format)."""
        return np.column_stack([self.classes.astype(np.float64), self.corners]) if len(self) else np.zeros((0, 7))


@dataclass(frozen=True)
class ImageClasses:
    """What is known of a whole case: classes present in it, classes absent from it; any other
    class is unknown. A one-of-K classification is ``present=(c,)`` with every other class absent."""

    present: tuple[int, ...]
    absent: tuple[int, ...] = ()


def _class_values(values: Any, what: str, where: str) -> np.ndarray:
    """``values`` as an ``(N,)`` int64 array of classes >= 1, or a :class:`StoreError`."""
    array = np.asarray(values)
    fix = "pass whole class values >= 1 (0 is background: never boxed or listed)."
    if array.ndim != 1:
        raise StoreError(f"{what} have shape {array.shape}, expected one value per item", path=where, fix=fix)
    if not array.size:
        return np.zeros(0, np.int64)
    whole = np.issubdtype(array.dtype, np.integer) or (
        np.issubdtype(array.dtype, np.floating) and bool(np.all(np.isfinite(array) & (array == np.round(array))))
    )
    if array.dtype == bool or not whole:
        raise StoreError(f"{what} must be whole numbers, got {array.tolist()[:5]}", path=where, fix=fix)
    array = array.astype(np.int64)
    if np.any(array < 1):
        raise StoreError(f"{what} hold {sorted(set(array[array < 1].tolist()))}: class 0 is background and classes are >= 1", path=where, fix=fix)
    return array


def check_boxes(corners: Any, classes: Any, shape_zyx: Sequence[int], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked boxes of a case of level-0 shape ``shape_zyx``: ``(corners (N, 6) float64, classes (N,) int64)``.

    Raises:
        StoreError: not ``(N, 6)``, NaN or infinite, a box empty along an axis (``z1 <= z0``)
            or reaching outside ``[0, shape)``, or classes that are not one whole number >= 1 per box.
    """
    array = np.asarray(corners, dtype=np.float64) if np.size(corners) else np.zeros((0, 6))
    if array.ndim != 2 or array.shape[1] != 6:
        raise StoreError(
            f"boxes have shape {array.shape}, expected (N, 6)", path=where, fix="pass one row (z0, y0, x0, z1, y1, x1) per box, level-0 voxel edges."
        )
    values = _class_values(classes, "box classes", where)
    if len(values) != len(array):
        raise StoreError(f"{len(array)} boxes but {len(values)} classes", path=where, fix="pass one class per box.")
    if not np.all(np.isfinite(array)):
        raise StoreError("box coordinates hold NaN or infinite values", path=where, fix="drop or fix those boxes.")
    low, high = array[:, :3], array[:, 3:]
    empty = np.flatnonzero(np.any(high <= low, axis=1))
    if len(empty):
        raise StoreError(
            f"box {int(empty[0])} {array[empty[0]].tolist()} is empty along an axis (z1 <= z0, y1 <= y0 or x1 <= x0)",
            path=where,
            fix="give corners (z0, y0, x0, z1, y1, x1) with z0 < z1, y0 < y1, x0 < x1 (half-open: a one-voxel box is [i, i + 1)).",
        )
    outside = np.flatnonzero(np.any(low < 0, axis=1) | np.any(high > np.asarray(shape_zyx, dtype=np.float64), axis=1))
    if len(outside):
        raise StoreError(
            f"box {int(outside[0])} {array[outside[0]].tolist()} reaches outside the image (0, 0, 0)..{tuple(int(s) for s in shape_zyx)}",
            path=where,
            fix="clip the boxes to the image, in level-0 voxel coordinates of the stored (RAS) array, not mm or the original orientation.",
        )
    return array, values


def check_class_names(names: Mapping[int, str] | None, where: str) -> dict[int, str] | None:
    """``{class >= 1: name}`` checked, or None."""
    if names is None:
        return None
    if not isinstance(names, Mapping) or not all(isinstance(v, str) for v in names.values()):
        raise StoreError(f"class_names must map class values to names, got {names!r}", path=where, fix="pass e.g. {1: 'lesion'}.")
    keys = _class_values(list(names), "class_names keys", where)
    return {int(k): v for k, v in zip(keys, names.values())}


def check_image_classes(present: Any, absent: Any, where: str) -> ImageClasses:
    """Checked image-level classes, each list sorted and without repeats.

    Raises:
        StoreError: values that are not whole numbers >= 1, or a class both present and absent.
    """
    known = {name: tuple(sorted(set(_class_values(list(values), f"{name} classes", where).tolist()))) for name, values in (("present", present), ("absent", absent))}
    both = sorted(set(known["present"]) & set(known["absent"]))
    if both:
        raise StoreError(f"class(es) {both} are listed both present and absent", path=where, fix="list each class in at most one of present and absent.")
    return ImageClasses(present=known["present"], absent=known["absent"])
