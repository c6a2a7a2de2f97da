"""Reading one case's patches: padded windows, intensity scaling and label locations.

Intensity modes (per channel, from the statistics recorded at ingest):

* ``"percentile"`` (default, PUMIT): clip to the case's 0.5-99.5 percentiles and
  scale to [0, 1]; 8-bit images (``uint8``) are divided by 255 instead. The
  percentiles are PUMIT's, over the foreground ("body": voxels above the channel
  minimum, inside their bounding box) where ingest recorded them (store format 2);
  stores of format 1 have only all-voxel percentiles, which a CT padded with
  -3024 outside its field of view shifts (air then maps to ~0.5, not 0).
* ``"zscore"``: subtract the case's mean and divide by its standard deviation.
* ``"none"``: raw values as float32.

Padding (where a window reaches outside the volume) takes the channel's
minimum, so after scaling it reads as background; labels pad with 0.

Annotated masks: a label version saved with ``annotated=`` (the slices a person
reviewed) is known only there. :func:`select_label` pins a case's version and the
slices a stream may use, :class:`AnnotatedMask` reads the mask at the read level,
and :meth:`CaseReader.label_index` finds the annotated voxels of each class, so
samplers only place patches where something is known.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zarr

from spadkit.data.cache import CachedArray, ChunkCache
from spadkit.data.chunkfile import LocalChunkReader
from spadkit.data.patches import window_slices
from spadkit.data.plan import Split
from spadkit.data.sources import CaseInfo
from spadkit.errors import SpadkitError, StoreError
from spadkit.io.omezarr import OMEZarrStore
from spadkit.volume import Volume

Intensity = Literal["percentile", "zscore", "none"]
INTENSITY_MODES = ("percentile", "zscore", "none")
#: Voxels kept per class (and of the annotated region) for label-weighted sampling (a uniform subsample).
MAX_LOCATIONS_PER_CLASS = 10_000


@dataclass(frozen=True)
class LabelSelection:
    """Which version of a case's label map a stream reads, and which of its voxels count as annotated.

    Args:
        version: the label version (fixed when the stream is made, so a correction saved
            while training does not mix two versions in one epoch).
        masked: the version has an annotated mask (``OMEZarrStore.read_annotated``); voxels
            outside it are unknown. ``False``: every voxel is annotated.
        slices: the Z slices (indices at the read level) the stream may use, as chosen by a
            :class:`~spadkit.data.plan.Split`; ``None``: all; ``()``: none (the case is left out).
    """

    version: int
    masked: bool = False
    slices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class LabelIndex:
    """Where a case's annotated labels are (found once per case, see :meth:`CaseReader.label_index`).

    Coordinates are ``(N, 3)`` int32 ``(z, y, x)`` at the read level, uniform subsamples of at most
    :data:`MAX_LOCATIONS_PER_CLASS` voxels drawn with a fixed seed, so every worker and rank agrees.
    """

    classes: dict[int, np.ndarray]
    """Foreground class -> its annotated voxels."""
    counts: dict[int, int]
    """Foreground class -> number of its annotated voxels (all of them, not the subsample)."""
    annotated: np.ndarray | None
    """The annotated voxels of any class, background included; None where every voxel is annotated."""
    annotated_count: int | None
    """Number of annotated voxels; None where every voxel is annotated."""


class AnnotatedMask:
    """A label version's annotated mask at the read level: ``(Z, Y, X)``, True where a person labelled.

    At level 0 the stored ``uint8`` array is read window by window through the chunk cache. At a
    coarser level (down-sampling ``factor``), a voxel counts as annotated only when its whole
    level-0 block is (the label pyramid's block mode would otherwise mix in unknown voxels); that
    mask is computed once, slab by slab, and held in memory (``1 / prod(factor)`` of level 0).
    """

    def __init__(self, array: zarr.Array, factor: Sequence[int], shape: Sequence[int], cache: ChunkCache):
        self.shape = tuple(int(s) for s in shape)
        self._cached: CachedArray | None = None
        self._memory: np.ndarray | None = None
        if all(int(f) == 1 for f in factor):
            self._cached = CachedArray(array, cache)
        else:
            self._memory = _all_blocks(array, factor, self.shape)

    @classmethod
    def open(cls, store: OMEZarrStore, case: CaseInfo, version: int, cache: ChunkCache) -> AnnotatedMask | None:
        """The mask of ``case``'s label version at its read level, or None (the version is fully annotated)."""
        array = store.read_annotated(case.case_id, case.label, version)
        if array is None:
            return None
        return cls(array, case.pyramid_factors[case.level] if case.pyramid_factors else (1, 1, 1), case.spatial_shape, cache)

    def read(self, box: Sequence[slice], out: np.ndarray, *, cached: bool = True) -> None:
        """Copy ``mask[box]`` (in-bounds ``(z, y, x)`` slices) into the bool array ``out``
        (``cached=False``: without filling the chunk cache, for scans)."""
        if self._memory is not None:
            out[...] = self._memory[tuple(box)]
        elif cached:
            self._cached.read(box, out)
        else:
            self._cached.read_uncached(box, out)

    def rows(self) -> np.ndarray:
        """``(Z,)`` bool: the slices holding at least one annotated voxel (a scan, slab by slab)."""
        depth, height, width = self.shape
        step = self._cached.chunks[0] if self._cached is not None else depth
        rows = np.zeros(depth, bool)
        for z0 in range(0, depth, step):
            slab = np.empty((min(step, depth - z0), height, width), bool)
            self.read((slice(z0, z0 + len(slab)), slice(0, height), slice(0, width)), slab, cached=False)
            rows[z0 : z0 + len(slab)] = slab.any(axis=(1, 2))
        return rows


def _all_blocks(array: zarr.Array, factor: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """``(Z, Y, X)`` bool at the level of ``shape``: True where every voxel of the level-0 block is nonzero."""
    fz, fy, fx = (int(f) for f in factor)
    depth, height, width = shape
    out = np.empty(shape, bool)
    planes = max(1, int(array.chunks[0]) // fz)  # whole chunk rows of level 0 per read
    for z0 in range(0, depth, planes):
        z1 = min(depth, z0 + planes)
        block = np.asarray(array[z0 * fz : z1 * fz, : height * fy, : width * fx]) != 0
        out[z0:z1] = block.reshape(z1 - z0, fz, height, fy, width, fx).all(axis=(1, 3, 5))
    return out


def select_label(store: OMEZarrStore, case: CaseInfo, split: Split | None = None) -> LabelSelection:
    """Pin ``case``'s latest label version and choose the slices a stream may use.

    Reads the version's annotated mask (if any) once, slab by slab. ``slices`` of the result
    is ``()`` where the split leaves the case nothing (its annotated slices all lie in the
    other part): the stream then leaves the case out.

    Raises:
        SpadkitError: the version has an annotated mask with no voxel in it (nothing to learn from).
    """
    version = int(store.label_versions(case.case_id, case.label)[-1]["version"])
    mask = AnnotatedMask.open(store, case, version, ChunkCache(0))
    rows = np.ones(case.spatial_shape[0], bool) if mask is None else mask.rows()
    if not rows.any():
        raise SpadkitError(
            f"case {case.case_id}: label {case.label!r} version {version} has an empty annotated mask, so there is nothing to learn from",
            path=case.store,
            fix="annotate (review) at least one slice of it and save a new version, save it with annotated=None if every voxel "
            "is labelled, or leave the case out (DatasetSource(cases=[...])).",
        )
    masked = mask is not None
    if split is None:
        return LabelSelection(version, masked)
    if split.by == "case":
        return LabelSelection(version, masked, None if split.selects(case.case_id) else ())
    step = case.pyramid_factors[case.level][0] if case.pyramid_factors else 1
    return LabelSelection(version, masked, tuple(int(z) for z in np.flatnonzero(rows) if split.selects(case.case_id, int(z) * step)))


class _Reservoir:
    """A uniform random subsample of at most :data:`MAX_LOCATIONS_PER_CLASS` coordinates, fed in
    pieces (the smallest random keys are kept)."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.size, self.count = rng, MAX_LOCATIONS_PER_CLASS, 0
        self.coords, self.keys = np.zeros((0, 3), np.int32), np.zeros(0)

    def add(self, coords: np.ndarray) -> None:
        self.count += len(coords)
        coords, keys = np.concatenate([self.coords, coords.astype(np.int32)]), np.concatenate([self.keys, self.rng.random(len(coords))])
        if len(coords) > self.size:
            best = np.argpartition(keys, self.size)[: self.size]
            coords, keys = coords[best], keys[best]
        self.coords, self.keys = coords, keys


class CaseReader:
    """Patches of one case, read through a shared chunk cache.

    Args:
        case: the case (and which label map to read).
        store: its store.
        cache: the process's chunk cache.
        intensity: the intensity mode.
        selection: the label version and annotated voxels to read (default: the latest
            version, every voxel annotated).
    """

    def __init__(self, case: CaseInfo, store: OMEZarrStore, cache: ChunkCache, intensity: Intensity = "percentile", selection: LabelSelection | None = None):
        self.case = case
        image = _open(lambda: store.read_image(case.case_id, case.level), case, "image")
        self.image = CachedArray(image, cache, chunk_reader=LocalChunkReader.open(image, case.store, strict=case.all_chunks_written))
        self.label = None
        self.annotated: AnnotatedMask | None = None
        self._slices: np.ndarray | None = None  # (Z,) bool: the slices a split lets this reader use
        if case.label is not None:
            version = None if selection is None else selection.version
            label = _open(lambda: store.read_label(case.case_id, case.label, version=version, level=case.level), case, f"label {case.label!r}")
            self.label = CachedArray(label, cache, chunk_reader=LocalChunkReader.open(label, case.store, strict=case.all_chunks_written))
            if selection is not None and selection.masked:
                self.annotated = AnnotatedMask.open(store, case, selection.version, cache)
            if selection is not None and selection.slices is not None:
                self._slices = np.zeros(case.spatial_shape[0], bool)
                self._slices[list(selection.slices)] = True
        self.offset, self.scale, self.clip = intensity_transform(case, intensity)
        self.pad_value = np.asarray([s.get("min", 0.0) for s in case.intensity] or [0.0] * case.shape[0], dtype=np.float32)
        self._index: LabelIndex | None = None
        self._lock = threading.Lock()

    @property
    def partial(self) -> bool:
        """Some voxels of the label are unknown (an annotated mask, or a split's slices)."""
        return self.annotated is not None or self._slices is not None

    def read_image(self, start: Sequence[int], out: np.ndarray) -> None:
        """Fill ``out`` ``(C, pz, py, px)`` float32 with the scaled window at ``start`` (z, y, x)."""
        source, target = window_slices(start, out.shape[1:], self.case.spatial_shape)
        if any(t.stop - t.start < n for t, n in zip(target, out.shape[1:])):
            out[...] = self.pad_value[:, None, None, None]
        if all(s.stop > s.start for s in source):
            self.image.read((slice(0, self.case.shape[0]), *source), out[(slice(None), *target)])
        for channel, view in enumerate(out):
            view -= self.offset[channel]
            view *= self.scale[channel]
            if self.clip:
                np.clip(view, 0.0, 1.0, out=view)

    def read_label(self, start: Sequence[int], out: np.ndarray) -> None:
        """Fill ``out`` ``(1, pz, py, px)`` with the label window at ``start``; 0 outside the volume."""
        source, target = window_slices(start, out.shape[1:], self.case.spatial_shape)
        out[...] = 0
        if all(s.stop > s.start for s in source):
            self.label.read((slice(0, 1), *source), out[(slice(None), *target)])

    def read_annotated(self, start: Sequence[int], out: np.ndarray) -> None:
        """Fill ``out`` ``(1, pz, py, px)`` bool with the annotated mask of the window at ``start``.

        All True where every voxel is annotated (padding included: the label's 0 there has
        always been trained as background); on a partial case, False outside the volume.
        """
        if not self.partial:
            out[...] = True
            return
        source, target = window_slices(start, out.shape[1:], self.case.spatial_shape)
        out[...] = False
        if all(s.stop > s.start for s in source):
            self._known(source, out[(0, *target)])

    def _known(self, box: Sequence[slice], out: np.ndarray, *, cached: bool = True) -> None:
        """``out`` (bool, the shape of the in-bounds ``(z, y, x)`` ``box``): annotated mask AND the split's slices."""
        if self.annotated is not None:
            self.annotated.read(box, out, cached=cached)
        else:
            out[...] = True
        if self._slices is not None:
            out &= self._slices[box[0]][:, None, None]

    def class_locations(self) -> dict[int, np.ndarray]:
        """Annotated foreground voxel coordinates per class, ``{class: (N, 3) int (z, y, x)}`` (see :meth:`label_index`)."""
        return self.label_index().classes

    def label_index(self) -> LabelIndex:
        """Where the annotated voxels of each class are, and the annotated region itself.

        Found once per case by scanning the label (and its annotated mask) at the read level
        slab by slab (one chunk row of Z at a time, so memory stays bounded). The read level
        is used, not a coarser one: the label pyramid keeps every ``f``-th voxel, so a small
        structure (a lesion of a few voxels) can vanish from a coarse level.
        """
        with self._lock:
            if self._index is None:
                self._index = self._scan()
            return self._index

    def _scan(self) -> LabelIndex:
        labels = self.label
        rng = np.random.default_rng(0)
        classes: dict[int, _Reservoir] = {}
        annotated = _Reservoir(rng) if self.partial else None
        step, (depth, height, width) = labels.chunks[1], labels.shape[1:]
        for z0 in range(0, depth, step):
            slab = np.empty((min(step, depth - z0), height, width), dtype=labels.array.dtype)
            box = (slice(z0, z0 + len(slab)), slice(0, height), slice(0, width))
            labels.read_uncached((slice(0, 1), *box), slab[None])
            foreground = slab != 0
            if annotated is not None:
                known = np.empty(slab.shape, bool)
                self._known(box, known, cached=False)
                foreground &= known
                for plane in np.flatnonzero(known.any(axis=(1, 2))):  # plane by plane: bounded memory on a full mask
                    where = np.argwhere(known[plane])
                    annotated.add(np.column_stack([np.full(len(where), z0 + plane), where]))
            coords = np.argwhere(foreground)
            if not len(coords):
                continue
            values = slab[tuple(coords.T)]
            coords[:, 0] += z0
            for value in np.unique(values):
                classes.setdefault(int(value), _Reservoir(rng)).add(coords[values == value])
        return LabelIndex(
            classes={value: classes[value].coords for value in sorted(classes)},
            counts={value: classes[value].count for value in sorted(classes)},
            annotated=None if annotated is None else annotated.coords,
            annotated_count=None if annotated is None else annotated.count,
        )


def intensity_transform(case: CaseInfo, mode: Intensity) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(offset[C], scale[C], clip)`` so that ``(x - offset) * scale`` (clipped to [0, 1]
    when ``clip``) is the scaled intensity."""
    channels = case.shape[0]
    if mode not in INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {INTENSITY_MODES}, not {mode!r}")
    if mode == "none":
        return np.zeros(channels, np.float32), np.ones(channels, np.float32), False
    if mode == "percentile" and case.dtype == "uint8":
        return np.zeros(channels, np.float32), np.full(channels, 1 / 255, np.float32), False
    stats = case.intensity
    if mode == "percentile" and stats and all("body" in s for s in stats):
        stats = tuple(s["body"] for s in stats)
    keys = ("p0.5", "p99.5") if mode == "percentile" else ("mean", "std")
    if len(stats) != channels or any(k not in s for s in stats for k in keys):
        raise StoreError(
            f"case {case.case_id} lacks the intensity statistics {keys} needed for intensity={mode!r}",
            path=case.store,
            fix="re-ingest it with a current `spadkit ingest`, or pass intensity='none'.",
        )
    offset = np.asarray([s[keys[0]] for s in stats], np.float32)
    if mode == "percentile":
        spread = np.asarray([s["p99.5"] - s["p0.5"] for s in stats], np.float32)
    else:
        spread = np.asarray([s["std"] for s in stats], np.float32)
    return offset, (1.0 / np.where(spread > 0, spread, 1.0)).astype(np.float32), mode == "percentile"


class ReaderPool:
    """Open :class:`CaseReader` objects of one process, least recently used closed first.

    The label indexes of closed readers are kept (up to ``max_locations`` cases, ~120 kB
    per class at most), so a dataset with more cases than ``max_open`` does not rescan
    its label volumes on every visit.
    """

    def __init__(self, cache: ChunkCache, intensity: Intensity, max_open: int = 256, max_locations: int = 8192):
        self.cache = cache
        self.intensity = intensity
        self.max_open = max_open
        self.max_locations = max_locations
        self._readers: OrderedDict[tuple, CaseReader] = OrderedDict()
        self._stores: dict[str, OMEZarrStore] = {}
        self._indexes: OrderedDict[tuple, LabelIndex] = OrderedDict()
        self._lock = threading.Lock()

    def store(self, case: CaseInfo) -> OMEZarrStore:
        """The store object of ``case``, shared by its readers."""
        with self._lock:
            store = self._stores.get(case.store)
        if store is None:
            store = OMEZarrStore(case.store, storage_options=case.storage_options)
            with self._lock:
                store = self._stores.setdefault(case.store, store)
        return store

    def get(self, case: CaseInfo, selection: LabelSelection | None = None) -> CaseReader:
        # level, label and selection are part of the key: two sources may read one store at two
        # levels, with and without a label map, or two parts of a split
        key = (case.store, case.case_id, case.level, case.label, selection)
        with self._lock:
            reader = self._readers.get(key)
            if reader is not None:
                self._readers.move_to_end(key)
                return reader
        reader = CaseReader(case, self.store(case), self.cache, self.intensity, selection)
        with self._lock:
            reader._index = self._indexes.get(key)
            self._readers[key] = reader
            while len(self._readers) > self.max_open:
                closed_key, closed = self._readers.popitem(last=False)
                if closed._index is not None:
                    self._indexes[closed_key] = closed._index
                    self._indexes.move_to_end(closed_key)
                    while len(self._indexes) > self.max_locations:
                        self._indexes.popitem(last=False)
        return reader


def _open(read: Callable[[], Volume], case: CaseInfo, what: str) -> zarr.Array:
    """The Zarr array of a store read, with a missing array reported as lost data."""
    try:
        return read().array
    except (FileNotFoundError, KeyError) as error:
        raise StoreError(
            f"the {what} array of case {case.case_id} (level {case.level}) is missing",
            path=case.store,
            fix="the store changed since it was indexed or lost files: copy it again or re-ingest the case.",
        ) from error
