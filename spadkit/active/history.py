"""The annotation log: what every label version of a session records, and how the state is replayed.

A session never keeps state of its own that the store does not have. Every
correction, undo and redo is a new label version whose ``message`` is
``"annotation " + JSON`` (:func:`encode`) with:

* ``op``: ``"correction"``, ``"undo"`` or ``"redo"``; ``target``: the correction
  version undone or redone; ``parent``: the version whose content the state had
  before (0: the empty label);
* ``item``: what a person reviewed: ``{"axis": a, "index": i}`` (a slice) or
  ``{"box": [[z0, z1], [y0, y1], [x0, x1]]}`` (a 3D region), with its ``split``
  (``"train"`` or ``"validation"``, fixed when the correction is submitted);
* ``annotated``: every item in force after this version (the version's annotated
  region: voxels outside it are unknown, never background);
* ``model``: the model version whose prediction was corrected; ``voxels_changed``
  against the previous label; ``edit_dice`` and ``changed_fraction`` against
  that prediction.

Because the author and time are added by the store under the same atomic
metadata write, a version and its record appear together or not at all.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

#: Prefix of a session version's message.
PREFIX = "annotation "
#: Every VALIDATION_EVERY-th correction (counting from 1, at VALIDATION_OFFSET) joins the validation split.
VALIDATION_EVERY = 4
VALIDATION_OFFSET = 3
AXIS_NAMES = ("z", "y", "x")


def split_of(ordinal: int) -> str:
    """The split of the ``ordinal``-th distinct slice or box ever corrected (1-based): fixed, never reshuffled."""
    return "validation" if ordinal % VALIDATION_EVERY == VALIDATION_OFFSET % VALIDATION_EVERY else "train"


def encode(record: Mapping[str, Any]) -> str:
    return PREFIX + json.dumps(dict(record), sort_keys=True)


def decode(message: str) -> dict[str, Any] | None:
    """The record of a session version, or None for any other version (ingested, predicted, ...)."""
    if not message.startswith(PREFIX):
        return None
    try:
        record = json.loads(message[len(PREFIX) :])
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("op") in {"correction", "undo", "redo"} else None


def item_box(item: Mapping[str, Any], shape: Sequence[int]) -> tuple[slice, slice, slice]:
    """The voxels ``(z, y, x)`` slices an item covers on a grid of ``shape``."""
    if "box" in item:
        return tuple(slice(int(a), int(b)) for a, b in item["box"])
    box = [slice(0, n) for n in shape]
    box[int(item["axis"])] = slice(int(item["index"]), int(item["index"]) + 1)
    return tuple(box)


def item_key(item: Mapping[str, Any]) -> tuple:
    """A hashable identity of an item (its slice or box, not its split)."""
    return ("box", *map(tuple, item["box"])) if "box" in item else ("slice", int(item["axis"]), int(item["index"]))


def region_mask(items: Iterable[Mapping[str, Any]], shape: Sequence[int], split: str | None = None) -> np.ndarray:
    """``(Z, Y, X)`` bool union of the items (of one ``split`` when given)."""
    mask = np.zeros(tuple(shape), bool)
    for item in items:
        if split is None or item.get("split") == split:
            mask[item_box(item, shape)] = True
    return mask


@dataclasses.dataclass
class Entry:
    """One session version: its store entry (version, time, author) and its record."""

    version: int
    time: str
    author: str
    record: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        out = {"version": self.version, "time": self.time, "author": self.author}
        out.update({k: v for k, v in self.record.items() if k != "annotated"})
        return out


@dataclasses.dataclass
class Log:
    """The replayed state of a label map's session versions.

    Attributes:
        entries: session versions, oldest first.
        done: correction versions in force (the undo stack, last on top).
        undone: corrections undone and not yet redone (the redo stack).
        base: the version the first correction started from (0: none).
        splits: the split of every item ever corrected (``item_key`` -> split); fixed for good.
        latest: the newest version of the label map, session or not (0: none).
        foreign: versions after the last session version that the session did not write.
    """

    entries: list[Entry]
    done: list[int]
    undone: list[int]
    base: int
    splits: dict[tuple, str]
    latest: int
    foreign: list[int]

    @property
    def annotated(self) -> list[dict[str, Any]]:
        """The items in force (empty before the first correction)."""
        return list(self.entries[-1].record.get("annotated", [])) if self.entries else []

    def entry(self, version: int) -> Entry:
        return next(e for e in self.entries if e.version == version)


def replay(versions: Sequence[Mapping[str, Any]]) -> Log:
    """Rebuild the undo/redo stacks from a label map's versions (``store.label_versions``)."""
    entries, done, undone = [], [], []
    base, splits, foreign = 0, {}, []
    for v in versions:
        record = decode(str(v.get("message", "")))
        if record is None:
            foreign.append(int(v["version"]))
            if not entries:
                base = int(v["version"])
            continue
        foreign = []
        entries.append(Entry(int(v["version"]), str(v.get("time", "")), str(v.get("author", "")), record))
        if record["op"] == "correction":
            splits.setdefault(item_key(record["item"]), record["item"].get("split", "train"))
            done.append(int(v["version"]))
            undone.clear()
        elif record["op"] == "undo" and done and done[-1] == record["target"]:
            undone.append(done.pop())
        elif record["op"] == "redo" and undone and undone[-1] == record["target"]:
            done.append(undone.pop())
    latest = int(versions[-1]["version"]) if versions else 0
    return Log(entries, done, undone, base, splits, latest, foreign)


def annotated_mask(store: Any, case_id: str, name: str = "seg", version: int | None = None) -> np.ndarray | None:
    """``(Z, Y, X)`` bool voxels a person reviewed in a label version (latest by default).

    Read from the store's annotated mask of the version (``read_annotated``), else from the session
    record (versions saved before stores kept masks). Returns None for a version no session wrote
    (ingested or predicted labels: the caller decides whether they count as fully annotated). This
    is the mask fine-tuning should pass as ``batch["annotated"]``: voxels outside it are unknown,
    never background.
    """
    versions = store.label_versions(case_id, name)
    chosen = versions[-1] if version is None else next((v for v in versions if v["version"] == version), None)
    record = None if chosen is None else decode(str(chosen.get("message", "")))
    if record is None:
        return None
    stored = store.read_annotated(case_id, name, chosen["version"])
    return region_mask(record.get("annotated", []), store.read_image(case_id).spatial_shape) if stored is None else np.asarray(stored[...], bool)
