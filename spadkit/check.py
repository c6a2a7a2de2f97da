"""``spadkit check STORE``: verify every case of a store, and what ``spadkit ingest --repair`` redoes.

For each case folder the check reports the first problem it finds:

* its ``zarr.json`` is missing or unreadable (a *damaged* folder);
* it has no completion marker (an interrupted write, redone by any ingest re-run);
* its attributes lack what readers need, or an array of the image pyramid or of
  a label version is missing or has the wrong shape;
* a version of a box set or image-class record cannot be read, or holds boxes that
  are empty or reach outside the image, or classes that are not whole numbers >= 1;
* (``deep``, the default) a chunk file is missing (cases written with every chunk)
  or cannot be decoded: every chunk of every array is read once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from spadkit.errors import SpadkitError
from spadkit.io.annotations import check_boxes, check_image_classes
from spadkit.io.omezarr import BOXES, CLASSES, OMEZarrStore

#: Case attributes every reader relies on.
REQUIRED_ATTRS = ("affine", "shape_czyx", "spacing_zyx_mm", "pyramid_factors_zyx")


@dataclass
class CheckReport:
    """The outcome of :func:`check_store`."""

    store: str
    good: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.incomplete

    def summary(self) -> str:
        lines = [f"{self.store}: {len(self.good)} good, {len(self.problems)} damaged, {len(self.incomplete)} incomplete"]
        lines += [f"  DAMAGED {case}: {problem}" for case, problem in sorted(self.problems.items())]
        lines += [f"  INCOMPLETE {case}: an interrupted write (no completion marker)" for case in self.incomplete]
        if not self.ok:
            lines.append("Fix: `spadkit ingest DATASET --out STORE --repair` redoes these cases from their source files.")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"store": self.store, "ok": self.ok, "good": self.good, "incomplete": self.incomplete, "damaged": self.problems}


def _arrays(store: OMEZarrStore, case_id: str, attrs: dict[str, Any]) -> list[tuple[str, zarr.Array]]:
    """Every array of a case: ``(description, array)`` for each image level, label version level and
    annotated mask."""
    levels = range(len(attrs["pyramid_factors_zyx"]))
    arrays = [(f"image level {level}", store.read_image(case_id, level).array) for level in levels]
    for name in store.label_names(case_id):
        for version in store.label_versions(case_id, name):
            number = version["version"]
            arrays += [(f"label {name!r} v{number} level {level}", store.read_label(case_id, name, number, level).array) for level in levels]
            mask = store.read_annotated(case_id, name, number)
            if mask is not None:
                arrays.append((f"label {name!r} v{number} annotated mask", mask))
    return arrays


def _check_annotations(store: OMEZarrStore, case_id: str, shape_zyx: list[int]) -> None:
    """Read every version of the case's box sets and image-class records and check them as a save would.

    Raises:
        StoreError: naming the record and version.
    """
    for name in store.box_sets(case_id):
        for entry in store.record_versions(case_id, BOXES, name):
            boxes = store.read_boxes(case_id, name, entry["version"])
            check_boxes(boxes.corners, boxes.classes, shape_zyx, f"{store.url.rstrip('/')}/{case_id}/{BOXES}/{name} version {entry['version']}")
    for name in store.image_class_sets(case_id):
        for entry in store.record_versions(case_id, CLASSES, name):
            known = store.read_image_classes(case_id, name, entry["version"])
            check_image_classes(known.present, known.absent, f"{store.url.rstrip('/')}/{case_id}/{CLASSES}/{name} version {entry['version']}")


def _read_every_chunk(array: zarr.Array) -> None:
    """Decode every chunk of a ``(C, Z, Y, X)`` or ``(Z, Y, X)`` array once, a row of storage objects
    (chunks or shards) along Z at a time."""
    z_axis = array.ndim - 3
    rows = int((array.shards or array.chunks)[z_axis])
    for z0 in range(0, int(array.shape[z_axis]), rows):
        np.asarray(array[(slice(None),) * z_axis + (slice(z0, z0 + rows),)])


def check_case(store: OMEZarrStore, case_id: str, *, deep: bool = True) -> str | None:
    """What is wrong with a complete case, or None if nothing is.

    Args:
        store: the open store.
        case_id: a case that :meth:`OMEZarrStore.cases` lists (others are reported as such).
        deep: also read and decode every chunk (otherwise only metadata and array presence).
    """
    try:
        attrs = store.case_attrs(case_id)
        missing = [key for key in REQUIRED_ATTRS if key not in attrs]
        if missing:
            return f"its attributes lack {', '.join(missing)}"
        arrays = _arrays(store, case_id, attrs)
        _check_annotations(store, case_id, attrs["shape_czyx"][1:])
        if tuple(arrays[0][1].shape) != tuple(attrs["shape_czyx"]):
            return f"image level 0 has shape {tuple(arrays[0][1].shape)}, its attributes say {tuple(attrs['shape_czyx'])}"
        for what, array in arrays:
            if deep:
                try:
                    _read_every_chunk(array)
                except SpadkitError:
                    raise
                except Exception as err:  # codec errors differ per codec
                    return f"{what}: a chunk cannot be decoded ({type(err).__name__}: {err})"
    except SpadkitError as err:
        return f"{err.reason} (at {err.path})" if err.path else err.reason
    return None


def check_store(url: str, *, deep: bool = True, storage_options: dict[str, Any] | None = None) -> CheckReport:
    """Verify every case folder of the store at ``url`` (see the module docstring).

    Raises:
        StoreError: the store itself cannot be opened (missing, unreadable root metadata).
    """
    store = OMEZarrStore(url, storage_options=storage_options)
    report = CheckReport(store=url)
    for case_id, status in sorted(store.scan().items()):
        if isinstance(status, str):
            report.problems[case_id] = f"its folder is damaged: {status}"
        elif not status.get("complete"):
            report.incomplete.append(case_id)
        else:
            problem = check_case(store, case_id, deep=deep)
            if problem is None:
                report.good.append(case_id)
            else:
                report.problems[case_id] = problem
    return report
