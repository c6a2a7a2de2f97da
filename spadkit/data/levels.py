"""What a stream knows of each case beyond its image: its annotation levels, boxes and image-level classes.

A :class:`~spadkit.data.PatchStream` with ``joint_classes=K`` pins each case's box
set and image-class record when it is made (:func:`read_annotations`, like a label
version) and turns them into per-sample batch entries: ``boxes`` (in patch
coordinates, :mod:`spadkit.data.boxes`), ``box_known`` ``(K,)`` bool (the case has an
exhaustive box set covering class k) and ``image_classes`` ``(K,)`` int8 (1 known
present in the case, 0 known absent, -1 unknown).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spadkit.data.sources import CaseInfo
from spadkit.errors import SpadkitError
from spadkit.io.annotations import LEVELS, Boxes, ImageClasses
from spadkit.io.omezarr import OMEZarrStore

#: Probability that a patch of a case with boxes is drawn to overlap one of them.
BOX_RATIO = 0.5


@dataclass(frozen=True, eq=False)
class CaseAnnotations:
    """What a stream knows of one case beyond its image (pinned when the stream is made).

    Attributes:
        mask: the stream reads a label map of the case.
        boxes: its box set, or None.
        classes: its image-level classes, or None.
        rows: ``(N, 7)`` float64 ``[class, z0, y0, x0, z1, y1, x1]``, the box edges at the stream's read
            level (level-0 edges over the level's factor), stored axes; None without a box set.
    """

    mask: bool = False
    boxes: Boxes | None = None
    classes: ImageClasses | None = None
    rows: np.ndarray | None = None

    @property
    def levels(self) -> tuple[str, ...]:
        """The sample's annotation levels (:data:`~spadkit.io.annotations.LEVELS` order)."""
        has = {"mask": self.mask, "box": self.boxes is not None, "class": self.classes is not None}
        return tuple(level for level in LEVELS if has[level])

    def box_known(self, num_classes: int) -> np.ndarray:
        """``(K,)`` bool: True for the classes an exhaustive box set covers (never background)."""
        known = np.zeros(num_classes, bool)
        if self.boxes is not None and self.boxes.exhaustive:
            known[list(self.boxes.covered)] = True
        known[0] = False
        return known

    def image_classes(self, num_classes: int) -> np.ndarray:
        """``(K,)`` int8: 1 known present in the case, 0 known absent, -1 unknown."""
        values = np.full(num_classes, -1, np.int8)
        if self.classes is not None:
            values[list(self.classes.absent)] = 0
            values[list(self.classes.present)] = 1
        return values

    def classes_used(self) -> set[int]:
        """Every class value the case's boxes and image classes name."""
        used = set() if self.boxes is None else {*self.boxes.classes.tolist(), *self.boxes.covered}
        return used if self.classes is None else used | {*self.classes.present, *self.classes.absent}


def read_annotations(store: OMEZarrStore, case: CaseInfo, num_classes: int) -> CaseAnnotations:
    """The latest box set ``case.boxes`` and image-class record ``case.classes`` of a case (None where it has
    none: a source may box only some of its cases).

    Raises:
        SpadkitError: a class value outside ``1..num_classes - 1``.
    """
    boxes = None if case.boxes is None else store.read_boxes(case.case_id, case.boxes)
    classes = None if case.classes is None else store.read_image_classes(case.case_id, case.classes)
    factor = np.asarray(case.pyramid_factors[case.level] if case.pyramid_factors else (1, 1, 1), np.float64)
    rows = None if boxes is None else boxes.rows() / np.concatenate([[1.0], factor, factor])
    annotations = CaseAnnotations(mask=case.label is not None, boxes=boxes, classes=classes, rows=rows)
    bad = sorted(c for c in annotations.classes_used() if not 0 < c < num_classes)
    if bad:
        raise SpadkitError(
            f"case {case.case_id}: its boxes {case.boxes!r} / image classes {case.classes!r} name class(es) {bad}, "
            f"the stream has joint_classes={num_classes} (0 background, 1..{num_classes - 1})",
            path=case.store,
            fix=f"set joint_classes={max(bad) + 1} if those are real classes, or map the dataset's classes onto the joint ones.",
        )
    return annotations
