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
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import zarr

from spadkit.data.cache import CachedArray, ChunkCache
from spadkit.data.chunkfile import LocalChunkReader
from spadkit.data.patches import window_slices
from spadkit.data.sources import CaseInfo
from spadkit.errors import StoreError
from spadkit.io.omezarr import OMEZarrStore
from spadkit.volume import Volume

Intensity = Literal["percentile", "zscore", "none"]
INTENSITY_MODES = ("percentile", "zscore", "none")
#: Foreground voxels kept per class for label-weighted sampling (a uniform subsample).
MAX_LOCATIONS_PER_CLASS = 10_000


class CaseReader:
    """Patches of one case, read through a shared chunk cache."""

    def __init__(self, case: CaseInfo, store: OMEZarrStore, cache: ChunkCache, intensity: Intensity = "percentile"):
        self.case = case
        image = _open(lambda: store.read_image(case.case_id, case.level), case, "image")
        self.image = CachedArray(image, cache, chunk_reader=LocalChunkReader.open(image, case.store, strict=case.all_chunks_written))
        self.label = None
        if case.label is not None:
            label = _open(lambda: store.read_label(case.case_id, case.label, level=case.level), case, f"label {case.label!r}")
            self.label = CachedArray(label, cache, chunk_reader=LocalChunkReader.open(label, case.store, strict=case.all_chunks_written))
        self.offset, self.scale, self.clip = intensity_transform(case, intensity)
        self.pad_value = np.asarray([s.get("min", 0.0) for s in case.intensity] or [0.0] * case.shape[0], dtype=np.float32)
        self._locations: dict[int, np.ndarray] | None = None
        self._lock = threading.Lock()

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

    def class_locations(self) -> dict[int, np.ndarray]:
        """Foreground voxel coordinates per class, ``{class: (N, 3) int (z, y, x)}`` at the read level.

        Found once per case by scanning the label at the read level slab by slab
        (one chunk row of Z at a time, so memory stays bounded), keeping a uniform
        subsample of at most :data:`MAX_LOCATIONS_PER_CLASS` voxels per class drawn
        with a fixed seed, so every worker and rank agrees. The read level is used,
        not a coarser one: the label pyramid keeps every ``f``-th voxel, so a small
        structure (a lesion of a few voxels) can vanish from a coarse level.
        """
        with self._lock:
            if self._locations is None:
                self._locations = self._find_locations()
            return self._locations

    def _find_locations(self) -> dict[int, np.ndarray]:
        labels = self.label
        rng = np.random.default_rng(0)
        kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # class -> (coords, random keys)
        step, (depth, height, width) = labels.chunks[1], labels.shape[1:]
        for z0 in range(0, depth, step):
            slab = np.empty((min(step, depth - z0), height, width), dtype=labels.array.dtype)
            labels.read_uncached((slice(0, 1), slice(z0, z0 + len(slab)), slice(0, height), slice(0, width)), slab[None])
            coords = np.argwhere(slab != 0)
            if not len(coords):
                continue
            values = slab[tuple(coords.T)]
            coords[:, 0] += z0
            for value in np.unique(values):
                mine = coords[values == value].astype(np.int32)
                keys = rng.random(len(mine))
                if int(value) in kept:  # merge with what was kept, then keep the smallest keys
                    old_coords, old_keys = kept[int(value)]
                    mine, keys = np.concatenate([old_coords, mine]), np.concatenate([old_keys, keys])
                if len(mine) > MAX_LOCATIONS_PER_CLASS:
                    best = np.argpartition(keys, MAX_LOCATIONS_PER_CLASS)[:MAX_LOCATIONS_PER_CLASS]
                    mine, keys = mine[best], keys[best]
                kept[int(value)] = (mine, keys)
        return {value: kept[value][0] for value in sorted(kept)}


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

    The foreground locations of closed readers are kept (up to ``max_locations``
    cases, ~120 kB per class at most), so a dataset with more cases than
    ``max_open`` does not rescan its label volumes on every visit.
    """

    def __init__(self, cache: ChunkCache, intensity: Intensity, max_open: int = 256, max_locations: int = 8192):
        self.cache = cache
        self.intensity = intensity
        self.max_open = max_open
        self.max_locations = max_locations
        self._readers: OrderedDict[tuple[str, str, int, str | None], CaseReader] = OrderedDict()
        self._stores: dict[str, OMEZarrStore] = {}
        self._locations: OrderedDict[tuple[str, str, int, str | None], dict[int, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, case: CaseInfo) -> CaseReader:
        # level and label are part of the key: two sources may read one store at two
        # levels, or with and without a label map
        key = (case.store, case.case_id, case.level, case.label)
        with self._lock:
            reader = self._readers.get(key)
            if reader is not None:
                self._readers.move_to_end(key)
                return reader
        with self._lock:
            store = self._stores.get(case.store)
        if store is None:
            store = OMEZarrStore(case.store, storage_options=case.storage_options)
            with self._lock:
                store = self._stores.setdefault(case.store, store)
        reader = CaseReader(case, store, self.cache, self.intensity)
        with self._lock:
            reader._locations = self._locations.get(key)
            self._readers[key] = reader
            while len(self._readers) > self.max_open:
                closed_key, closed = self._readers.popitem(last=False)
                if closed._locations is not None:
                    self._locations[closed_key] = closed._locations
                    self._locations.move_to_end(closed_key)
                    while len(self._locations) > self.max_locations:
                        self._locations.popitem(last=False)
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
