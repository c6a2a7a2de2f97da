"""Chunk-wise voxel statistics: moments, exact percentiles, PUMIT's foreground, value checks.

Everything here reads a ``(Z, Y, X)`` (or ``(C, Z, Y, X)``) array slab by slab
(NumPy, Zarr, Dask or any array-like that can be sliced), so memory stays at a
few slabs whatever the volume's size. Percentiles are exact, equal to
``numpy.percentile`` (linear interpolation): integer data goes through a
histogram of its value range, other data through one copy of the selected
voxels in their own dtype.

PUMIT normalises each image by percentiles of its *foreground*: the voxels
above the channel's minimum (PUMIT crops the image to their bounding box
first, which holds all of them). On a CT padded with -3024 outside its field
of view this maps air (-1000) to 0 where all-voxel percentiles map it to 0.53.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from spadkit.errors import CorruptFileError, SpadkitError

#: Intensity percentiles recorded per case and channel (PUMIT/nnU-Net use 0.5 and 99.5).
PERCENTILES = (0.5, 1.0, 50.0, 99.0, 99.5)
#: Voxels read at once.
SLAB_VOXELS = 1 << 22
#: Integer data whose value range fits this many bins gets exact percentiles from a histogram.
MAX_HISTOGRAM_BINS = 1 << 22

#: ``select(z_slice, slab) -> bool mask`` picks the voxels of a slab that count (None: all).
Select = Callable[[slice, np.ndarray], np.ndarray] | None


class ChannelView:
    """One channel ``(Z, Y, X)`` of a ``(C, Z, Y, X)`` array, sliced lazily (``zarr.Array[c]`` would read it all)."""

    def __init__(self, array: Any, channel: int):
        self.array, self.channel = array, channel
        self.shape = tuple(int(s) for s in array.shape[1:])
        self.dtype = np.dtype(array.dtype)
        chunks = getattr(array, "chunks", None)
        self.chunks = tuple(chunks[1:]) if chunks else None

    def __getitem__(self, index: Any) -> Any:
        return self.array[(self.channel, *(index if isinstance(index, tuple) else (index,)))]


def channels(array: Any) -> list[ChannelView]:
    """The channels of a ``(C, Z, Y, X)`` array as lazy views."""
    return [ChannelView(array, c) for c in range(int(array.shape[0]))]


def _slab_slices(array: Any) -> Iterator[slice]:
    """Z ranges of about :data:`SLAB_VOXELS` voxels that never split a chunk (a Zarr chunk row, a Dask block)."""
    depth, plane = int(array.shape[0]), int(np.prod(array.shape[1:], dtype=np.int64))
    planes = max(1, SLAB_VOXELS // max(1, plane))
    chunks = getattr(array, "chunks", None)
    if chunks and isinstance(chunks[0], tuple):  # Dask: block boundaries (a .nii.gz is one block: read it once)
        edges = np.cumsum((0, *chunks[0]))
    else:
        row = int(chunks[0]) if chunks else 1  # Zarr / ChannelView: a row of chunks
        edges = np.arange(0, depth + row, row).clip(max=depth)
    start = 0
    for stop in edges[1:]:
        if stop - start >= planes or stop == depth:
            yield slice(start, int(stop))
            start = int(stop)


def slabs(array: Any, source: str | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """``(z_slice, voxels)`` of a ``(Z, Y, X)`` array in slabs of whole chunk rows where it is chunked.

    Raises:
        CorruptFileError: a slab could not be read or decoded (names ``source`` and the slab).
    """
    for zs in _slab_slices(array):
        try:
            yield zs, np.asarray(array[zs])
        except SpadkitError:
            raise
        except Exception as err:  # codec and I/O errors differ per format and library
            raise CorruptFileError(
                f"cannot read slices {zs.start}..{zs.stop - 1} ({type(err).__name__}: {err})",
                path=source,
                fix="the file or chunk files are damaged: copy or export them again (for a store: `spadkit check STORE`).",
            ) from err


def _picked(zs: slice, slab: np.ndarray, select: Select) -> np.ndarray:
    return slab.ravel() if select is None else slab[select(zs, slab)]


def _moments(blocks: Iterator[np.ndarray]) -> tuple[int, float, float, float, float]:
    """``(count, mean, M2, min, max)`` over 1D blocks, merged with Chan et al.'s pairwise update."""
    count, mean, m2 = 0, 0.0, 0.0
    lo, hi = math.inf, -math.inf
    for values in blocks:
        if not values.size:
            continue
        n = int(values.size)
        batch_mean = float(values.mean(dtype=np.float64))
        batch_m2 = float(np.square(values - batch_mean, dtype=np.float64).sum())
        delta = batch_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += batch_m2 + delta * delta * count * n / total
        count = total
        lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    return count, mean, m2, lo, hi


def _ranks(count: int) -> list[tuple[int, int, float]]:
    """``(below, above, weight)`` per percentile: numpy's linear interpolation between two order statistics."""
    out = []
    for q in PERCENTILES:
        rank = (count - 1) * q / 100
        below = math.floor(rank)
        out.append((below, min(below + 1, count - 1), rank - below))
    return out


def _summary(count: int, mean: float, m2: float, lo: float, hi: float, order: Callable[[int], float]) -> dict[str, float]:
    """The statistics dict; ``order(r)`` is the ``r``-th smallest selected value."""
    out = {"min": lo, "max": hi, "mean": mean, "std": math.sqrt(max(m2 / count, 0.0)), "count": count}
    for p, (below, above, weight) in zip(PERCENTILES, _ranks(count)):
        a, b = order(below), order(above)
        out[f"p{p:g}"] = a + weight * (b - a)
    return out


def _histogram_summary(histogram: np.ndarray, offset: int) -> dict[str, float] | None:
    """Statistics of integer values given as counts per value ``offset + i``."""
    present = np.flatnonzero(histogram)
    if not present.size:
        return None
    values = offset + np.arange(histogram.size, dtype=np.float64)
    count = int(histogram.sum())
    mean = float(histogram @ values) / count
    m2 = float(histogram @ np.square(values - mean))
    cumulative = np.cumsum(histogram)
    return _summary(count, mean, m2, float(offset + present[0]), float(offset + present[-1]), lambda r: float(offset + np.searchsorted(cumulative, r, side="right")))


def _is_histogram_friendly(dtype: np.dtype, lo: float, hi: float) -> bool:
    return np.issubdtype(dtype, np.integer) and hi - lo < MAX_HISTOGRAM_BINS


def _histogram(channel: Any, select: Select, lo: float, hi: float, source: str | None) -> np.ndarray:
    histogram = np.zeros(int(hi - lo) + 1, dtype=np.int64)
    for zs, slab in slabs(channel, source):
        histogram += np.bincount((_picked(zs, slab, select).astype(np.int64) - int(lo)).ravel(), minlength=histogram.size)
    return histogram


def _gather(channel: Any, select: Select, count: int, source: str | None) -> np.ndarray:
    """The selected voxels in one 1D array (their own float dtype, else float64)."""
    dtype = np.dtype(channel.dtype)
    values = np.empty(count, dtype=dtype if dtype.kind == "f" else np.float64)
    filled = 0
    for zs, slab in slabs(channel, source):
        picked = _picked(zs, slab, select)
        values[filled : filled + picked.size] = picked
        filled += picked.size
    return values


def _partitioned(values: np.ndarray, ranks: list[int]) -> Callable[[int], float]:
    """Partition ``values`` in place around ``ranks`` (no copy); return the order statistic lookup."""
    values.partition(sorted(set(ranks)))
    return lambda r: float(values[r])


def describe(channel: Any, select: Select = None, source: str | None = None) -> dict[str, float] | None:
    """Statistics of the selected voxels of a ``(Z, Y, X)`` channel; None when none is selected.

    Returns:
        ``{min, max, mean, std, count, p0.5, p1, p50, p99, p99.5}``.
    """
    count, mean, m2, lo, hi = _moments(_picked(zs, slab, select) for zs, slab in slabs(channel, source))
    if not count:
        return None
    if _is_histogram_friendly(channel.dtype, lo, hi):
        return _histogram_summary(_histogram(channel, select, lo, hi, source), int(lo))
    values = _gather(channel, select, count, source)
    order = _partitioned(values, [r for below, above, _ in _ranks(count) for r in (below, above)])
    return _summary(count, mean, m2, lo, hi, order)


def describe_with_body(channel: Any, source: str | None = None) -> tuple[dict[str, float], dict[str, float] | None]:
    """Statistics of all voxels of a channel and of its foreground ("body": voxels above the minimum).

    Integer data takes two passes (range, then one histogram for both); other data
    one pass plus one copy of the voxels, partitioned in place for both sets of ranks.
    """
    count, mean, m2, lo, hi = _moments(slab.ravel() for _, slab in slabs(channel, source))
    if _is_histogram_friendly(channel.dtype, lo, hi):
        histogram = _histogram(channel, None, lo, hi, source)
        return _histogram_summary(histogram, int(lo)), _histogram_summary(histogram[1:], int(lo) + 1)
    values = _gather(channel, None, count, source)
    step = SLAB_VOXELS
    body = _moments(values[i : i + step][values[i : i + step] > lo] for i in range(0, count, step))
    floor_count = count - body[0]  # the body's r-th value is the whole set's (floor_count + r)-th
    ranks = [r for below, above, _ in _ranks(count) for r in (below, above)]
    if body[0]:
        ranks += [floor_count + r for below, above, _ in _ranks(body[0]) for r in (below, above)]
    order = _partitioned(values, ranks)
    everything = _summary(count, mean, m2, lo, hi, order)
    return everything, (_summary(*body, lambda r: order(floor_count + r)) if body[0] else None)


def intensity_stats(image: Any, label: Any = None, source: str | None = None) -> list[dict[str, Any]]:
    """Per-channel statistics of an image ``(C, Z, Y, X)``, read chunk-wise.

    Each entry describes all voxels and adds ``"body"`` (PUMIT's foreground: voxels
    above the channel minimum) and, given a label map ``(1, Z, Y, X)``,
    ``"foreground"`` (label > 0, as nnU-Net normalises CT), when those exist.
    """
    stats = []
    for channel in channels(image):
        entry, body = describe_with_body(channel, source)
        if body is not None:
            entry["body"] = body
        if label is not None:
            foreground = describe(channel, lambda zs, slab: np.asarray(label[0, zs]) > 0, source)
            if foreground is not None:
                entry["foreground"] = foreground
        stats.append(entry)
    return stats


def count_where(array: Any, predicate: Callable[[np.ndarray], np.ndarray], source: str | None = None) -> int:
    """Number of voxels of a ``(C, Z, Y, X)`` array where ``predicate`` holds, chunk-wise."""
    return sum(int(np.count_nonzero(predicate(slab))) for channel in channels(array) for _, slab in slabs(channel, source))


def value_range(array: Any, source: str | None = None) -> tuple[float, float, int]:
    """``(min, max, non-finite count)`` of a ``(C, Z, Y, X)`` array, chunk-wise; NaN/Inf are left out of the range."""
    lo, hi, bad = math.inf, -math.inf, 0
    floating = np.issubdtype(np.dtype(array.dtype), np.floating)
    for channel in channels(array):
        for _, slab in slabs(channel, source):
            if floating:
                finite = np.isfinite(slab)
                bad += int(slab.size - np.count_nonzero(finite))
                slab = slab[finite]
            if slab.size:
                lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
    return lo, hi, bad
