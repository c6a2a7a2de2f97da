"""spadkit's OME-Zarr store: one NGFF 0.5 (Zarr v3) multiscale image per case, labels with versions.

Layout of a store (a local folder or an fsspec URL such as ``s3://bucket/ds.zarr``)::

    STORE.zarr/
      zarr.json                 root group; attrs["spadkit"]: dataset, catalog entry, fingerprint
      .spadkit/                 lock files of local writers (ingest, label saves); not Zarr
      <case_id>/                NGFF multiscale image, axes (c, z, y, x), scale in mm
        0/ 1/ 2/                resolution levels (spacing-aware: a coarse z is not halved)
        labels/
          seg/                  NGFF image-label; its `datasets` point at the latest version
            v0001/0 v0001/1     every saved edit is a new version (time, author, message)
            v0002/0 ...
            v0002/annotated     optional (z, y, x) uint8 mask: 1 = a person annotated the voxel
        boxes/                  box sets (attrs: their names); not NGFF, which NGFF readers ignore
          boxes/                one set; attrs list its versions (time, author, exhaustive, class names)
            v0001               (N, 7) float64 array, rows [class, z0, y0, x0, z1, y1, x1]
        classes/                image-level class records (attrs: their names)
          classes/              attrs list its versions, each with "present" and "absent" classes

Each case group carries ``attrs["spadkit"]`` with the full RAS affine, the
original (pre-reorientation) affine, modality, intensity statistics and
``complete: true``, which is written *last*: a case without it was interrupted
and is ignored by readers and redone by ``spadkit ingest``. A case folder whose
``zarr.json`` is missing or unreadable is *damaged*: it is left out of
:meth:`OMEZarrStore.cases`, listed by :meth:`OMEZarrStore.damaged_cases` and
named in a warning, and the rest of the store stays usable.

Every chunk of a case is written (even all-background ones) and the case says
so (``all_chunks_written``); reading such a case raises
:class:`~spadkit.errors.StoreError` for a missing chunk file instead of
returning zeros (:mod:`spadkit.io.zarrstore`).

Store format 2 (this version) adds PUMIT's foreground ("body") intensity
statistics and block-mode label pyramids; format-1 stores stay readable.

Label versions are *copy-on-write* on local stores: a save writes only the
chunk files (shards, in a sharded store: one per row of chunks along Z) that
differ from the latest version's, at every pyramid level, and hard-links the
others (:mod:`spadkit.io.zarrstore`), so each version stays a complete,
ordinary Zarr array; remote stores write every version in full. The files a
save wrote and their folders are fsync'd before the label's metadata is
atomically replaced to list the new version.

A label version may record which voxels were *annotated* (reviewed by a
person, partial supervision): the array ``annotated`` inside the version's
folder, level 0 only, on the label's chunk grid. It is an ordinary Zarr array
beside the NGFF ``datasets`` (which only list the levels), so NGFF readers
(ome-zarr-py, napari-ome-zarr) see the label exactly as before. A version
without it (every version of older stores, or saved with ``annotated=None``)
is fully annotated; its entry says so (``"annotated": false``).

Weaker annotations than a label map (:mod:`spadkit.io.annotations`) sit beside
``labels/``, versioned like it: *box sets* (level-0 voxel edges of the stored
array, half-open, one class each; ``exhaustive`` when every object of the set's
classes is boxed) and *image-level classes* (known present / known absent in the
case). NGFF 0.5 defines no boxes or tables, so they are ordinary Zarr v3 groups
(and one small array per box version) that ome-zarr-py and napari-ome-zarr
skip: they read only ``multiscales`` datasets and ``labels``. A box version's
array is written and fsync'd before the set's ``zarr.json`` (replaced in one
atomic write) lists it, and an image-class version lives in that document
itself, so neither can be half-written. :meth:`OMEZarrStore.annotation_levels`
says which levels (``mask``, ``box``, ``class``) a case has.

Volumes are stored in canonical RAS orientation; NGFF has no orientation or
rotation field, so ``coordinateTransformations`` hold the spacing and the
origin and viewers (napari-ome-zarr) show the right physical scale.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from nibabel.orientations import aff2axcodes
from ome_zarr.format import FormatV05
from ome_zarr.writer import write_multiscales_metadata

from spadkit.errors import StoreError
from spadkit.io.annotations import (
    LEVELS,
    Boxes,
    ImageClasses,
    check_boxes,
    check_class_names,
    check_image_classes,
)
from spadkit.io.lock import LABEL_LOCK_TIMEOUT_S, store_lock
from spadkit.io.pyramid import (
    COMPRESSOR,
    Box,
    UnitCounts,
    chunk_shape,
    create_array,
    datasets,
    level_affine,
    pyramid_factors,
    write_arrays,
    write_levels,
)
from spadkit.io.zarrstore import LOST_CHUNK_FIX, open_store, run_sync
from spadkit.volume import LabelVolume, Volume

__all__ = ["STORE_FORMAT", "OMEZarrStore", "StoreDamageWarning", "check_name", "chunk_shape", "now_iso", "pyramid_factors"]

#: Version of spadkit's own attributes inside the store (2: "body" intensity statistics).
STORE_FORMAT = 2
NGFF = FormatV05()
#: Lock file of ``spadkit ingest`` runs, relative to the store root.
INGEST_LOCK = ".spadkit/ingest.lock"
#: Stored dtype of label maps.
LABEL_DTYPE = np.dtype(np.int32)

#: Name of the annotated-mask array inside a label version's folder.
ANNOTATED = "annotated"
#: Groups of a case holding box sets and image-level class records (see the module docstring).
BOXES, CLASSES = "boxes", "classes"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED = {"labels", "zarr.json"}
_AXES = [
    {"name": "c", "type": "channel"},
    {"name": "z", "type": "space", "unit": "millimeter"},
    {"name": "y", "type": "space", "unit": "millimeter"},
    {"name": "x", "type": "space", "unit": "millimeter"},
]
REPAIR_FIX = "run `spadkit check STORE` to list every damaged case, then `spadkit ingest DATASET --out STORE --repair` to redo them."


class StoreDamageWarning(UserWarning):
    """Some case folders of a store are unreadable; they are left out and named."""


def now_iso() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check_name(name: Any, what: str, url: str) -> None:
    """Refuse a case id or label name that is not a safe single path component.

    Raises:
        StoreError: empty, ``.``/``..``, a separator, or a reserved name.
    """
    if not isinstance(name, str) or not _NAME.match(name) or name in _RESERVED:
        raise StoreError(f"invalid {what} {name!r}", path=url, fix="use letters, digits, '_', '.', '-' and start with a letter or digit.")


def annotated_mask(annotated: Any, shape_zyx: tuple[int, int, int], where: str) -> np.ndarray | None:
    """Check an annotated mask for a label of spatial shape ``shape_zyx``; ``(Z, Y, X)`` uint8 0/1, or None if fully annotated.

    Raises:
        StoreError: not ``(Z, Y, X)`` (or ``(1, Z, Y, X)``) of that shape, not bool or integer, or
            integer values other than 0 and 1.
    """
    if annotated is None:
        return None
    mask = np.asarray(annotated)
    if mask.ndim == 4 and mask.shape[0] == 1:
        mask = mask[0]
    fix_shape = f"pass a (Z, Y, X) = {tuple(shape_zyx)} mask of the label's voxels, True where a person annotated them (None: all)."
    if mask.shape != tuple(shape_zyx):
        raise StoreError(f"the annotated mask has shape {mask.shape}, the label's voxels {tuple(shape_zyx)}", path=where, fix=fix_shape)
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        raise StoreError(f"the annotated mask has dtype {mask.dtype}, not bool or integer", path=where, fix="pass a bool mask (e.g. `probability > 0.5`).")
    if mask.dtype != bool and mask.size and (mask.min() < 0 or mask.max() > 1):
        raise StoreError(f"the annotated mask holds values {int(mask.min())}..{int(mask.max())}, not only 0 and 1", path=where, fix="pass `mask > 0` (1 = annotated).")
    return None if mask.all() else mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)


def changed_box(changed: Any, shape_zyx: tuple[int, int, int], where: str) -> Box | None:
    """The ``(C, Z, Y, X)`` box ``[lo, hi)`` of a ``changed=(z, y, x)`` slices hint, clamped to the grid.

    Raises:
        StoreError: not three slices with step 1.
    """
    if changed is None:
        return None
    if not (isinstance(changed, tuple | list) and len(changed) == 3 and all(isinstance(s, slice) and s.step in (None, 1) for s in changed)):
        raise StoreError(f"changed={changed!r} is not three (z, y, x) slices", path=where, fix="pass e.g. `(slice(k, k + 1), slice(None), slice(None))` for slice z=k, or None.")
    return ((0, 1), *(s.indices(n)[:2] for s, n in zip(changed, shape_zyx)))


def _case_status(raw: bytes | None) -> dict[str, Any] | str:
    """A case's spadkit attributes from its ``zarr.json`` bytes, or why they cannot be read."""
    if raw is None:
        return "its zarr.json is missing"
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        return f"its zarr.json is not valid JSON ({err})"
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        return "its zarr.json does not describe a Zarr group"
    attrs = (doc.get("attributes") or {}).get("spadkit", {})
    return attrs if isinstance(attrs, dict) else "its spadkit attributes are not a JSON object"


class OMEZarrStore:
    """A collection of cases in one OME-Zarr hierarchy (see the module docstring).

    Args:
        url: local path or fsspec URL of the store.
        mode: ``"r"`` (read only, must exist), ``"a"`` (read/write, create if missing).
        storage_options: passed to fsspec for remote URLs.
        sharded: when creating the store, pack each array level into one shard file
            (fewer files, slightly slower patch reads); recorded in the store.

    Raises:
        StoreError: no store at ``url``, an unreadable root ``zarr.json``, a group not
            written by spadkit, or a store format newer than this spadkit.
    """

    #: Share unchanged chunk files between label versions (local stores); False writes every version in full.
    _copy_on_write = True

    def __init__(self, url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None, *, sharded: bool = False):
        self.url = str(url)
        self.mode = mode
        self._store = open_store(self.url, mode, storage_options)
        self._warned_damage = False
        try:
            self.root = zarr.open_group(store=self._store, mode=mode, zarr_format=3)
        except FileNotFoundError:
            raise StoreError("no OME-Zarr store here", path=self.url, fix="create it with `spadkit ingest DATASET --out STORE.zarr`.") from None
        except (ValueError, TypeError) as err:  # JSONDecodeError, or valid JSON that is no Zarr metadata
            raise StoreError(
                f"the store's root metadata cannot be read ({type(err).__name__}: {err})",
                path=f"{self.url.rstrip('/')}/zarr.json",
                fix="restore zarr.json from a copy of the store; or move it away and run `spadkit ingest DATASET --out STORE` "
                "again, which writes a new one and keeps the complete cases.",
            ) from None
        if mode != "r" and "spadkit" not in self.root.attrs:
            self.root.attrs["spadkit"] = {"store_format": STORE_FORMAT, "created": now_iso(), "sharded": sharded}
        info = self.root.attrs.get("spadkit")
        if not isinstance(info, dict):
            raise StoreError("this Zarr group was not written by spadkit", path=self.url, fix="ingest the data with `spadkit ingest`.")
        self._store.check_frames = not info.get("sharded", False)
        if int(info.get("store_format", 0)) > STORE_FORMAT:
            raise StoreError(f"store format {info['store_format']} is newer than this spadkit ({STORE_FORMAT})", path=self.url, fix="upgrade spadkit.")

    # ------------------------------------------------------------------ store level
    @property
    def info(self) -> dict[str, Any]:
        """The store's own attributes (dataset name, catalog entry, ...)."""
        return dict(self.root.attrs["spadkit"])

    @property
    def sharded(self) -> bool:
        return bool(self.root.attrs["spadkit"].get("sharded", False))

    def update_info(self, **values: Any) -> None:
        self.root.attrs["spadkit"] = {**self.info, **values}

    def scan(self) -> dict[str, dict[str, Any] | str]:
        """Every case folder: its spadkit attributes, or (a string) why they cannot be read."""
        names = [n for n in self._store.children("") if n != "zarr.json" and not n.startswith(".")]
        docs = self._store.get_many([f"{name}/zarr.json" for name in names])
        # a name without zarr.json is a case folder that lost it, or a plain file (not a case)
        return {name: _case_status(raw) for name, raw in zip(names, docs) if raw is not None or self._store.children(name)}

    def cases(self) -> list[str]:
        """Ids of the complete cases, sorted; damaged case folders are named in a :class:`StoreDamageWarning`."""
        status = self.scan()
        damaged = {name: reason for name, reason in status.items() if isinstance(reason, str)}
        if damaged and not self._warned_damage:
            self._warned_damage = True
            listing = "; ".join(f"{name}: {reason}" for name, reason in sorted(damaged.items()))
            warnings.warn(f"{self.url}: {len(damaged)} damaged case(s) left out ({listing}). Fix: {REPAIR_FIX}", StoreDamageWarning, stacklevel=2)
        return sorted(name for name, attrs in status.items() if isinstance(attrs, dict) and attrs.get("complete"))

    def incomplete_cases(self) -> list[str]:
        """Ids of case groups an interrupted write left behind (no completion marker)."""
        return sorted(name for name, attrs in self.scan().items() if isinstance(attrs, dict) and not attrs.get("complete"))

    def damaged_cases(self) -> dict[str, str]:
        """Case folders whose ``zarr.json`` is missing or unreadable: ``{case_id: reason}``."""
        return {name: reason for name, reason in sorted(self.scan().items()) if isinstance(reason, str)}

    def _status(self, case_id: str) -> dict[str, Any] | str | None:
        """One case's attributes, the reason it is damaged, or None if there is no such folder."""
        [raw] = self._store.get_many([f"{case_id}/zarr.json"])
        if raw is None and not self._store.children(case_id):
            return None
        return _case_status(raw)

    def __contains__(self, case_id: str) -> bool:
        status = self._status(case_id) if _NAME.match(case_id) else None
        return isinstance(status, dict) and bool(status.get("complete"))

    def __len__(self) -> int:
        return len(self.cases())

    # ------------------------------------------------------------------ cases
    def _case(self, case_id: str) -> zarr.Group:
        check_name(case_id, "case id", self.url)
        status = self._status(case_id)
        if isinstance(status, str):
            raise StoreError(f"case {case_id} is damaged: {status}", path=f"{self.url.rstrip('/')}/{case_id}", fix=REPAIR_FIX)
        if not status or not status.get("complete"):
            raise StoreError(f"no complete case {case_id!r}", path=self.url, fix=f"available: {', '.join(self.cases()[:10]) or 'none'}.")
        if status.get("all_chunks_written"):
            self._store.strict.add(case_id)
        return self.root[case_id]

    def remove_case(self, case_id: str) -> None:
        """Delete a case folder, whatever state it is in (used before redoing a case)."""
        check_name(case_id, "case id", self.url)
        self._store.strict.discard(case_id)
        run_sync(self._store.delete_dir(case_id))

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        return dict(self._case(case_id).attrs["spadkit"])

    def write_case(
        self,
        case_id: str,
        image: Volume,
        label: LabelVolume | None = None,
        *,
        attrs: Mapping[str, Any] | None = None,
        author: str | None = None,
    ) -> None:
        """Write one case: the image pyramid, the label (as version 1) and, last, the completion marker.

        Any earlier folder of the case is removed first. ``image.meta["spacing_assumed"]``
        is recorded as the case attribute ``spacing_assumed``.

        Args:
            case_id: letters, digits, ``_ . -``; not ``labels``.
            image: the image, already in the orientation to store (ingest passes RAS).
            label: optional label map on the image's grid.
            attrs: extra case attributes (intensity statistics, source files, ...).
            author: recorded with the label version (default: the OS user).
        """
        check_name(case_id, "case id", self.url)
        if label is not None:
            label.check_matches(image)
        self.remove_case(case_id)
        group = self.root.create_group(case_id)
        data = image.numpy()
        factors = pyramid_factors(image.spatial_shape, image.spacing)
        write_levels(group, "", data, factors, image.spacing, dtype=data.dtype, label=False, sharding="array" if self.sharded else None)
        write_multiscales_metadata(group, datasets("", factors, image.spacing, image.origin[::-1]), fmt=NGFF, axes=_AXES, name=case_id)
        if label is not None:
            self._write_label_version(case_id, group, "seg", label, author=author, message="ingested", factors=factors)
        original_affine = np.asarray(image.meta.get("original_affine", image.affine))
        group.attrs["spadkit"] = {
            **dict(attrs or {}),
            "affine": image.affine.tolist(),
            "original_affine": original_affine.tolist(),
            "original_orientation": "".join(aff2axcodes(original_affine)),
            "modality": image.modality,
            "spacing_zyx_mm": list(image.spacing),
            "spacing_assumed": bool(image.meta.get("spacing_assumed", False)),
            "shape_czyx": list(image.shape),
            "pyramid_factors_zyx": [list(f) for f in factors],
            "all_chunks_written": True,
            "case_format": STORE_FORMAT,
            "written": now_iso(),
            "complete": True,
        }
        if int(self.info.get("store_format", 0)) < STORE_FORMAT:
            self.update_info(store_format=STORE_FORMAT)

    def read_image(self, case_id: str, level: int = 0) -> Volume:
        """The case's image at a pyramid level as a lazy :class:`Volume` (Zarr-backed).

        Raises:
            StoreError: no such complete case or level, a damaged case, or (on reading
                voxels) a chunk file that was written and is gone.
        """
        group = self._case(case_id)
        attrs = group.attrs["spadkit"]
        array = self._level_array(group, "", level, len(attrs["pyramid_factors_zyx"]), f"case {case_id} is marked complete but its image")
        affine = level_affine(np.asarray(attrs["affine"]), attrs["pyramid_factors_zyx"][level])
        meta = {"source": f"{self.url}/{case_id}", "case_id": case_id, "format": "ome-zarr", "spacing_assumed": bool(attrs.get("spacing_assumed", False))}
        return Volume(array, affine, modality=attrs.get("modality"), meta=meta)

    def _level_array(self, group: zarr.Group, prefix: str, level: int, num_levels: int, what: str) -> zarr.Array:
        where = f"{self.url.rstrip('/')}/{group.path}"
        if not 0 <= level < num_levels:
            raise StoreError(f"level {level} out of range 0..{num_levels - 1}", path=where, fix="pick an existing pyramid level.")
        try:
            return group[f"{prefix}{level}"]
        except (KeyError, FileNotFoundError):
            raise StoreError(f"{what} level {level} is missing", path=where, fix=LOST_CHUNK_FIX) from None

    # ------------------------------------------------------------------ labels and versions
    def label_names(self, case_id: str) -> list[str]:
        group = self._case(case_id)
        if "labels" not in group:
            return []
        return list(group["labels"].attrs.get("ome", {}).get("labels", []))

    def label_versions(self, case_id: str, name: str = "seg") -> list[dict[str, Any]]:
        """Saved versions of a label map, oldest first.

        Each entry: ``version``, ``path``, ``time``, ``author``, ``message``,
        ``annotated`` (True when the version stores an annotated mask, see
        :meth:`read_annotated`) and what its save wrote: ``bytes_written``,
        ``chunks_written``, ``chunks_shared`` (storage objects, all levels).
        Entries of older stores lack the last four; ``annotated`` then reads False.
        """
        return [{"annotated": False, **entry} for entry in self._label_group(case_id, name).attrs["spadkit"]["versions"]]

    def _version_entry(self, group: zarr.Group, case_id: str, name: str, version: int | None) -> dict[str, Any]:
        """The metadata entry of one version of a label map (the latest for None)."""
        versions = group.attrs["spadkit"]["versions"]
        chosen = versions[-1] if version is None else next((v for v in versions if v["version"] == version), None)
        if chosen is None:
            raise StoreError(f"label {name!r} of {case_id} has no version {version}", path=self.url, fix=f"versions: {[v['version'] for v in versions]}.")
        return chosen

    def read_label(self, case_id: str, name: str = "seg", version: int | None = None, level: int = 0) -> LabelVolume:
        """A label map; the latest version unless ``version`` is given."""
        group = self._label_group(case_id, name)
        chosen = self._version_entry(group, case_id, name, version)
        attrs = self.case_attrs(case_id)
        what = f"case {case_id} is marked complete but its label {name!r} version {chosen['version']}"
        array = self._level_array(group, f"{chosen['path']}/", level, len(attrs["pyramid_factors_zyx"]), what)
        affine = level_affine(np.asarray(attrs["affine"]), attrs["pyramid_factors_zyx"][level])
        classes = {int(k): v for k, v in group.attrs["spadkit"].get("classes", {}).items()}
        meta = {"source": f"{self.url}/{case_id}/labels/{name}", "case_id": case_id, "version": chosen["version"]}
        return LabelVolume(array, affine, classes=classes, meta=meta)

    def read_annotated(self, case_id: str, name: str = "seg", version: int | None = None) -> zarr.Array | None:
        """The annotated mask of a label version: a lazy ``(Z, Y, X)`` uint8 array at level 0, 1 where
        a person annotated the voxel; None when that version is fully annotated (older stores, or saved
        without ``annotated=``). The latest version unless ``version`` is given.

        Raises:
            StoreError: no such case, label or version, or a mask the version records that is gone.
        """
        group = self._label_group(case_id, name)
        chosen = self._version_entry(group, case_id, name, version)
        if not chosen.get("annotated"):
            return None
        try:
            return group[f"{chosen['path']}/{ANNOTATED}"]
        except (KeyError, FileNotFoundError):
            where = f"{self.url.rstrip('/')}/{group.path}/{chosen['path']}"
            raise StoreError(f"label {name!r} version {chosen['version']} records an annotated mask that is missing", path=where, fix=LOST_CHUNK_FIX) from None

    def save_label(
        self,
        case_id: str,
        label: LabelVolume,
        name: str = "seg",
        *,
        author: str | None = None,
        message: str = "",
        annotated: np.ndarray | None = None,
        changed: tuple[slice, slice, slice] | None = None,
        base_version: int | None = None,
    ) -> int:
        """Save ``label`` as a new version (it becomes the default); return its number.

        Args:
            case_id: a complete case of the store.
            label: the whole label map ``(1, Z, Y, X)`` on the image's grid.
            name: the label map (``"seg"``).
            author: recorded with the version (default: the OS user).
            message: recorded with the version.
            annotated: ``(Z, Y, X)`` (or ``(1, Z, Y, X)``) bool or 0/1 integer mask of the voxels a
                person annotated; the rest are unknown, never background. None (or all ones):
                fully annotated.
            changed: ``(z, y, x)`` slices of a box outside which ``label`` equals the latest version
                (a hint: the rest is not compared but shared; the caller vouches for it).
            base_version: the version ``changed`` is relative to; when another save made a
                newer one meanwhile, the hint is ignored and every chunk compared.

        Saves of one label map are serialised by a lock file (local stores), so two
        processes saving at once get two versions. The arrays are written under a new
        version folder first, *copy-on-write* on local stores: only storage objects
        (chunk files, or shards) that differ from the latest version's are written, at
        every pyramid level; the others are hard links to the latest version's files, so
        each version stays a complete, ordinary Zarr array (remote stores write every
        version in full). The written files and their folders are fsync'd; then the
        label's metadata, which points readers at the latest version, is replaced in a
        single atomic write, so an interruption (even ``kill -9`` or a power cut) leaves
        the previous version in place and the store consistent. The version's entry
        records ``bytes_written``, ``chunks_written`` and ``chunks_shared``.

        Raises:
            StoreError: an invalid ``name``, an ``annotated`` mask of the wrong shape or dtype, or
                the lock is still held after :data:`~spadkit.io.lock.LABEL_LOCK_TIMEOUT_S` seconds.
            GeometryMismatchError: the label is not on the image's grid.
        """
        check_name(name, "label name", self.url)
        group = self._case(case_id)
        label.check_matches(self.read_image(case_id))
        where = f"{self.url.rstrip('/')}/{case_id}/labels/{name}"
        mask = annotated_mask(annotated, label.spatial_shape, where)
        box = changed_box(changed, label.spatial_shape, where)
        return self._write_label_version(case_id, group, name, label, author=author, message=message, annotated=mask, changed=box, base_version=base_version)

    def _write_version_arrays(
        self, group: zarr.Group, prefix: str, label: LabelVolume, annotated: np.ndarray | None, factors: Any, base: Mapping[str, Any] | None, changed: Box | None
    ) -> UnitCounts:
        """Write the label pyramid (and the annotated mask) of a new version at ``prefix``, sharing
        unchanged storage objects with the version ``base`` (None: write everything)."""

        def share(source: zarr.Array, target: zarr.Array, coords: tuple[int, ...]) -> bool:
            key = target.metadata.encode_chunk_key(coords)
            return self._store.share(f"{source.path}/{key}", f"{target.path}/{key}")

        def base_arrays(paths: list[str]) -> list[zarr.Array] | None:
            try:
                return None if base is None else [group[f"{base['path']}/{path}"] for path in paths]
            except (KeyError, FileNotFoundError):  # a damaged base: write in full
                return None

        sharding = "row" if self.sharded else None
        bases = base_arrays([str(level) for level in range(len(factors))])
        counts = write_levels(group, prefix, label.numpy(), factors, label.spacing, dtype=LABEL_DTYPE, label=True, sharding=sharding, bases=bases, changed=changed, share=share)
        if annotated is not None:
            chunks = chunk_shape(label.spatial_shape, label.spacing)[1:]
            array = create_array(group, f"{prefix}{ANNOTATED}", annotated.shape, chunks, dtype=np.dtype(np.uint8), sharding=sharding)
            mask_base = base_arrays([ANNOTATED]) if base is not None and base.get("annotated") else None
            counts += write_arrays([array], annotated, factors[:1], label=True, bases=mask_base, share=share)
        return counts

    def _label_group(self, case_id: str, name: str) -> zarr.Group:
        group = self._case(case_id)
        if "labels" not in group or name not in group["labels"]:
            raise StoreError(f"case {case_id} has no label {name!r}", path=self.url, fix=f"labels present: {self.label_names(case_id) or 'none'}.")
        return group["labels"][name]

    def _write_label_version(
        self,
        case_id: str,
        case_group: zarr.Group,
        name: str,
        label: LabelVolume,
        *,
        author: str | None,
        message: str,
        factors: Any = None,
        annotated: np.ndarray | None = None,
        changed: Box | None = None,
        base_version: int | None = None,
    ) -> int:
        """Write a new version under the label's lock: arrays copy-on-write against the latest version
        (local stores), fsync'd, then the label's metadata replaced atomically. Returns its number."""
        check_name(name, "label name", self.url)
        if factors is None:
            factors = case_group.attrs["spadkit"]["pyramid_factors_zyx"]
        lock = f".spadkit/labels/{case_id}/{name}.lock"
        with store_lock(self.url, lock, f"label save of {case_id}/{name}", timeout_s=LABEL_LOCK_TIMEOUT_S):
            labels = case_group.require_group("labels")  # read afresh under the lock
            existing = list(labels.attrs.get("ome", {}).get("labels", []))
            if name not in existing:
                labels.attrs["ome"] = {"version": NGFF.version, "labels": [*existing, name]}
            group = labels.require_group(name)
            previous = dict(group.attrs.get("spadkit", {}))
            versions = list(previous.get("versions", []))
            classes = label.classes or {int(k): v for k, v in previous.get("classes", {}).items()}  # an edit keeps the names
            number = versions[-1]["version"] + 1 if versions else 1
            prefix = f"v{number:04d}/"
            if prefix[:-1] in group:  # left by an interrupted save: never referenced, and we hold the lock
                del group[prefix[:-1]]
            base = versions[-1] if versions and self._store.local and self._copy_on_write else None
            hint = None if base is None or (base_version is not None and base_version != base["version"]) else changed
            with self._store.journal(f"{group.path}/{prefix}") as journal:
                counts = self._write_version_arrays(group, prefix, label, annotated, factors, base, hint)
                self._store.make_durable(journal, upto=group.path)  # before the metadata points at them
            entry = {
                "version": number,
                "path": prefix[:-1],
                "time": now_iso(),
                "author": author or getpass.getuser(),
                "message": message,
                "annotated": annotated is not None,
                "bytes_written": journal.bytes_written,
                "chunks_written": counts.written,
                "chunks_shared": counts.shared,
            }
            multiscale = {"name": name, "axes": _AXES, "datasets": datasets(prefix, factors, label.spacing, label.origin[::-1])}
            properties = [{"label-value": k, "name": v} for k, v in sorted(classes.items())]
            group.attrs.put(
                {
                    "ome": {
                        "version": NGFF.version,
                        "multiscales": [multiscale],
                        "image-label": {"version": NGFF.version, "source": {"image": "../../"}, **({"properties": properties} if properties else {})},
                    },
                    "spadkit": {"versions": [*versions, entry], "classes": {str(k): v for k, v in classes.items()}},
                }
            )
        return number

    # ------------------------------------------------------------------ boxes and image classes
    def save_boxes(
        self,
        case_id: str,
        boxes: np.ndarray,
        classes: Sequence[int],
        name: str = "boxes",
        *,
        exhaustive: bool = True,
        class_names: Mapping[int, str] | None = None,
        author: str | None = None,
        message: str = "",
    ) -> int:
        """Save a set of boxes of a case as a new version of ``boxes/<name>``; return its number.

        Args:
            case_id: a complete case of the store.
            boxes: ``(N, 6)`` level-0 voxel edges ``(z0, y0, x0, z1, y1, x1)`` of the stored (RAS)
                array, half-open (:mod:`spadkit.io.annotations`), inside the image; ``N`` may be 0.
            classes: ``(N,)`` class of each box, whole numbers ``>= 1`` (0 is background).
            name: the box set.
            exhaustive: every object of the set's classes (``class_names`` keys, else the boxes'
                classes) is boxed, so voxels outside their boxes are known free of them; an
                exhaustive empty set with ``class_names`` says "none of these anywhere".
            class_names: class value -> name (recorded, and the classes an exhaustive set covers).
            author, message: recorded with the version (author default: the OS user).

        The ``(N, 7)`` array ``[class, z0, y0, x0, z1, y1, x1]`` is written under a new version
        folder and fsync'd before the set's metadata, replaced in one atomic write, points at it:
        an interrupted save leaves the previous version (or no set) readable.

        Raises:
            StoreError: an invalid name or case, boxes that are not ``(N, 6)``, NaN, empty along an
                axis or outside the image, classes that are not whole numbers >= 1 (one per box),
                or the set's lock held for :data:`~spadkit.io.lock.LABEL_LOCK_TIMEOUT_S` seconds.
        """
        check_name(name, "box set name", self.url)
        where = f"{self.url.rstrip('/')}/{case_id}/{BOXES}/{name}"
        shape = self.case_attrs(case_id)["shape_czyx"][1:]
        corners, values = check_boxes(boxes, classes, shape, where)
        names = check_class_names(class_names, where)
        rows = np.column_stack([values.astype(np.float64), corners]) if len(values) else np.zeros((0, 7))

        def write(record: zarr.Group, path: str) -> None:
            array = record.create_array(
                path,
                shape=rows.shape,
                dtype=np.float64,
                chunks=(max(1, len(rows)), 7),
                compressors=[COMPRESSOR],
                dimension_names=("box", "field"),
                fill_value=0,
                overwrite=True,
                config={"write_empty_chunks": True},
            )
            array[...] = rows

        entry = {"count": len(rows), "exhaustive": bool(exhaustive), "class_names": None if names is None else {str(k): v for k, v in names.items()}}
        return self._save_record(case_id, BOXES, name, entry, author=author, message=message, write=write)

    def read_boxes(self, case_id: str, name: str = "boxes", version: int | None = None) -> Boxes | None:
        """The case's box set ``name`` (the latest version unless ``version`` is given), or None if it has none.

        Raises:
            StoreError: no such case or version, or the version's array is gone.
        """
        entry = self._record_entry(case_id, BOXES, name, version)
        if entry is None:
            return None
        record = self._case(case_id)[f"{BOXES}/{name}"]
        where = f"{self.url.rstrip('/')}/{record.path}"
        try:
            rows = np.asarray(record[entry["path"]][...], dtype=np.float64)
        except (KeyError, FileNotFoundError):
            raise StoreError(f"box set {name!r} version {entry['version']} is missing its array", path=where, fix=LOST_CHUNK_FIX) from None
        if rows.ndim != 2 or rows.shape[1] != 7:
            raise StoreError(f"box set {name!r} version {entry['version']} holds a {rows.shape} array, not (N, 7)", path=where, fix="save the boxes again with `save_boxes`.")
        names = entry.get("class_names")
        return Boxes(rows[:, 1:].copy(), rows[:, 0].astype(np.int64), bool(entry["exhaustive"]), None if names is None else {int(k): v for k, v in names.items()})

    def save_image_classes(
        self, case_id: str, present: Sequence[int], absent: Sequence[int] = (), name: str = "classes", *, author: str | None = None, message: str = ""
    ) -> int:
        """Save what is known of the whole case as a new version of ``classes/<name>``; return its number.

        Args:
            present: classes known present somewhere in the case (whole numbers >= 1).
            absent: classes known absent everywhere in it; a class in neither list is unknown.

        Raises:
            StoreError: an invalid name or case, values that are not whole numbers >= 1, a class in
                both lists, or the lock held too long.
        """
        check_name(name, "image class record name", self.url)
        known = check_image_classes(present, absent, f"{self.url.rstrip('/')}/{case_id}/{CLASSES}/{name}")
        return self._save_record(case_id, CLASSES, name, {"present": list(known.present), "absent": list(known.absent)}, author=author, message=message)

    def read_image_classes(self, case_id: str, name: str = "classes", version: int | None = None) -> ImageClasses | None:
        """The case's image-level classes ``name`` (latest version unless ``version``), or None if it has none."""
        entry = self._record_entry(case_id, CLASSES, name, version)
        if entry is None:
            return None
        try:
            return ImageClasses(tuple(entry["present"]), tuple(entry["absent"]))
        except (KeyError, TypeError):
            raise StoreError(
                f"image classes {name!r} version {entry.get('version')} lack their present/absent lists",
                path=f"{self.url.rstrip('/')}/{case_id}/{CLASSES}/{name}",
                fix="save them again with `save_image_classes`.",
            ) from None

    def box_sets(self, case_id: str) -> list[str]:
        """Names of the case's box sets that have a saved version."""
        return self._record_names(case_id, BOXES)

    def image_class_sets(self, case_id: str) -> list[str]:
        """Names of the case's image-level class records that have a saved version."""
        return self._record_names(case_id, CLASSES)

    def annotation_levels(self, case_id: str) -> tuple[str, ...]:
        """The :data:`~spadkit.io.annotations.LEVELS` the case has, in that order: ``"mask"`` with a label
        map (any name), ``"box"`` with a box set, ``"class"`` with image-level classes; ``()``: unlabelled."""
        has = {"mask": bool(self.label_names(case_id)), "box": bool(self.box_sets(case_id)), "class": bool(self.image_class_sets(case_id))}
        return tuple(level for level in LEVELS if has[level])

    def record_versions(self, case_id: str, kind: str, name: str) -> list[dict[str, Any]]:
        """Saved versions of a box set (``kind="boxes"``) or image-class record (``"classes"``), oldest first:
        ``version``, ``time``, ``author``, ``message`` and the record's own fields; ``[]`` if it has none."""
        group = self._case(case_id)
        if kind not in (BOXES, CLASSES):
            raise StoreError(f"unknown annotation kind {kind!r}", path=self.url, fix=f"use {BOXES!r} or {CLASSES!r}.")
        check_name(name, f"{kind} name", self.url)
        if f"{kind}/{name}" not in group:
            return []
        return list(group[f"{kind}/{name}"].attrs.get("spadkit", {}).get("versions", []))

    def _record_entry(self, case_id: str, kind: str, name: str, version: int | None) -> dict[str, Any] | None:
        versions = self.record_versions(case_id, kind, name)
        if not versions:
            return None
        chosen = versions[-1] if version is None else next((v for v in versions if v["version"] == version), None)
        if chosen is None:
            raise StoreError(f"{kind} {name!r} of {case_id} has no version {version}", path=self.url, fix=f"versions: {[v['version'] for v in versions]}.")
        return chosen

    def _record_names(self, case_id: str, kind: str) -> list[str]:
        group = self._case(case_id)
        if kind not in group:
            return []
        return [name for name in group[kind].attrs.get("spadkit", {}).get("names", []) if self.record_versions(case_id, kind, name)]

    def _save_record(
        self,
        case_id: str,
        kind: str,
        name: str,
        fields: Mapping[str, Any],
        *,
        author: str | None,
        message: str,
        write: Callable[[zarr.Group, str], None] | None = None,
    ) -> int:
        """Append a version to ``<case>/<kind>/<name>`` under the case's ``kind`` lock: ``write(record, path)``
        writes its arrays (fsync'd) first, then the record's metadata is replaced atomically. Returns its number."""
        case_group = self._case(case_id)
        with store_lock(self.url, f".spadkit/{kind}/{case_id}.lock", f"{kind} save of {case_id}/{name}", timeout_s=LABEL_LOCK_TIMEOUT_S):
            parent = case_group.require_group(kind)  # read afresh under the lock
            names = list(parent.attrs.get("spadkit", {}).get("names", []))
            if name not in names:
                parent.attrs.put({"spadkit": {"names": [*names, name]}})
            record = parent.require_group(name)
            versions = list(record.attrs.get("spadkit", {}).get("versions", []))
            number = versions[-1]["version"] + 1 if versions else 1
            path = f"v{number:04d}"
            if write is not None:
                if path in record:  # left by an interrupted save: never referenced, and we hold the lock
                    del record[path]
                with self._store.journal(f"{record.path}/{path}/") as journal:
                    write(record, path)
                    self._store.make_durable(journal, upto=record.path)
            entry = {"version": number, **({"path": path} if write else {}), "time": now_iso(), "author": author or getpass.getuser(), "message": message, **fields}
            record.attrs.put({"spadkit": {"versions": [*versions, entry]}})
        return number
