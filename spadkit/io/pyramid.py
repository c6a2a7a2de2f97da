"""Resolution pyramids of the store: chunk shapes, level factors, down-sampling and writing.

Each level is computed from the previous one (factor 1 or 2 per axis), slab
by slab, so writing a case needs little memory beyond the level-0 array:
images take the block mean, labels the block mode (the most frequent value,
ties to the smallest), so that every level's voxels sit at the block centres
that its affine (:func:`level_affine`) and the NGFF translation describe.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from spadkit.errors import SpadkitError

#: How an array is sharded: not at all, one shard per array, or one per row of chunks along Z.
Sharding = Literal["array", "row"] | None
#: ``[lo, hi)`` voxel bounds per axis.
Box = tuple[tuple[int, int], ...]

#: Chunk edge (voxels) for the finest axis; coarser axes get proportionally fewer voxels
#: so that a chunk spans a similar physical extent (see benchmarks/chunking.py).
CHUNK_EDGE = 64
#: Smallest chunk edge along any axis.
MIN_CHUNK_EDGE = 16
#: Fastest compressed codec for random patch reads (benchmarks/chunking.py: 64^3 lz4
#: ~4-5 ms per 96^3 patch vs ~6 ms zstd, ~20 ms with 32^3 chunks). Sharding (one shard
#: per level) cuts a volume's files from hundreds to one but costs ~1.5-2 ms per patch:
#: it is opt-in (``OMEZarrStore(..., sharded=True)``) for object storage and huge collections.
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
#: Stop adding pyramid levels once the largest in-plane size is at most this.
MIN_LEVEL_SIZE = 64
MAX_LEVELS = 5
#: Voxels of the source level processed at once while down-sampling.
SLAB_VOXELS = 1 << 23


def chunk_shape(spatial_shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, int, int, int]:
    """Chunk shape ``(1, cz, cy, cx)`` for random 3D patch reads.

    The finest axis gets :data:`CHUNK_EDGE` voxels; an axis ``k`` times coarser
    gets the power of two nearest ``CHUNK_EDGE / k`` (at least
    :data:`MIN_CHUNK_EDGE`), so a chunk covers a roughly cubic physical extent.
    No chunk edge exceeds the array. A 2D image gets ``(1, 1, 256, 256)`` tiles.
    """
    if spatial_shape[0] == 1:
        return (1, 1, min(256, spatial_shape[1]), min(256, spatial_shape[2]))
    finest = min(spacing)
    edges = []
    for size, space in zip(spatial_shape, spacing):
        ideal = CHUNK_EDGE * finest / space
        edge = max(MIN_CHUNK_EDGE, 2 ** round(math.log2(ideal)))
        edges.append(int(min(edge, size)))
    return (1, *edges)


def pyramid_factors(spatial_shape: Sequence[int], spacing: Sequence[float]) -> list[tuple[int, int, int]]:
    """Per-level down-sampling factors ``(fz, fy, fx)`` relative to level 0.

    Each level halves the axes that are clearly finer than the coarsest one
    (spacing below ``coarsest / sqrt(2)``), or all axes once the grid is about
    isotropic, so that an anisotropic 1x1x3 mm volume first becomes isotropic
    instead of squashing its few slices. A size-1 axis is never halved.
    """
    factors = [(1, 1, 1)]
    shape = np.asarray(spatial_shape, dtype=float)
    space = np.asarray(spacing, dtype=float)
    while len(factors) < MAX_LEVELS and shape[1:].max() > MIN_LEVEL_SIZE:
        can = shape >= 2 * MIN_CHUNK_EDGE
        fine = can & (space * math.sqrt(2) < space[can].max(initial=0))
        halve = fine if fine.any() else can
        if not halve.any():
            break
        shape = np.where(halve, np.floor(shape / 2), shape)
        space = np.where(halve, space * 2, space)
        factors.append(tuple(int(f * (2 if h else 1)) for f, h in zip(factors[-1], halve)))
    return factors


def block_mode(blocks: np.ndarray) -> np.ndarray:
    """Most frequent value of each row of ``blocks`` ``(N, k)``; ties go to the smallest value."""
    ordered = np.sort(blocks, axis=1)
    counts = np.zeros(ordered.shape, dtype=np.int16)
    for j in range(ordered.shape[1]):
        counts += ordered == ordered[:, j : j + 1]
    best = np.argmax(counts, axis=1)  # first maximum: the smallest of the tied values
    return ordered[np.arange(len(ordered)), best]


def downsample(array: np.ndarray, factor: Sequence[int], *, label: bool) -> np.ndarray:
    """Down-sample ``(C, Z, Y, X)`` by the integer ``factor`` ``(fz, fy, fx)``, slab by slab.

    Trailing voxels that do not fill a block are dropped. Images take the block
    mean (rounded for integer dtypes), labels the block mode (no new values).
    """
    fz, fy, fx = (int(f) for f in factor)
    c, z, y, x = array.shape
    out = np.empty((c, z // fz, y // fy, x // fx), dtype=array.dtype)
    planes = max(1, SLAB_VOXELS // max(1, c * fz * y * x))
    for z0 in range(0, out.shape[1], planes):
        z1 = min(out.shape[1], z0 + planes)
        slab = np.asarray(array[:, z0 * fz : z1 * fz, : out.shape[2] * fy, : out.shape[3] * fx])
        if label:
            blocks = slab.reshape(c, z1 - z0, fz, out.shape[2], fy, out.shape[3], fx)
            rows = blocks.transpose(0, 1, 3, 5, 2, 4, 6).reshape(-1, fz * fy * fx)
            out[:, z0:z1] = block_mode(rows).reshape(c, z1 - z0, out.shape[2], out.shape[3])
        else:
            mean = _block_sum(slab, (fz, fy, fx))
            mean *= np.float32(1 / (fz * fy * fx))
            out[:, z0:z1] = mean if np.issubdtype(array.dtype, np.floating) else np.rint(mean)
    return out


def _block_sum(slab: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    """Float32 sums over blocks of ``factor`` (Z, Y, X) voxels, one axis at a time over strided views
    (several times faster than a multi-axis ``mean`` of a 7D reshape)."""
    total = slab.astype(np.float32)
    for axis, f in zip((1, 2, 3), factor):
        if f > 1:
            parts = [total[(slice(None),) * axis + (slice(offset, None, f),)] for offset in range(f)]
            total = parts[0] + parts[1]
            for part in parts[2:]:
                total += part
    return total


def datasets(prefix: str, factors: Sequence[Sequence[int]], spacing: Sequence[float], origin_zyx: Sequence[float]) -> list[dict]:
    """NGFF ``datasets`` entries: scale in mm and the world position of each level's first voxel centre."""
    out = []
    for level, factor in enumerate(factors):
        scale = [float(s * f) for s, f in zip(spacing, factor)]
        shift = [float(o + (f - 1) * s / 2) for o, f, s in zip(origin_zyx, factor, spacing)]
        out.append(
            {
                "path": f"{prefix}{level}",
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, *scale]},
                    {"type": "translation", "translation": [0.0, *shift]},
                ],
            }
        )
    return out


def create_array(group: zarr.Group, path: str, shape: Sequence[int], chunks: Sequence[int], *, dtype: np.dtype, sharding: Sharding = None) -> zarr.Array:
    """Create (replacing) the array ``path`` of ``group`` as the store keeps every array: blosc-lz4,
    fill 0, every chunk written; axes ``(c, z, y, x)`` (or the last ``len(shape)`` of them).

    ``chunks`` are clamped to ``shape``. ``sharding``: None (one file per chunk), ``"array"``
    (one shard file for the whole array) or ``"row"`` (one shard per row of chunks along Z,
    the unit a label version rewrites when a slice changes).
    """
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    shards = None
    if sharding is not None:
        shards = tuple(math.ceil(s / c) * c for s, c in zip(shape, chunks))
        if sharding == "row":
            shards = (*shards[:-3], chunks[-3], *shards[-2:])
    return group.create_array(
        path,
        shape=tuple(shape),
        dtype=dtype,
        chunks=chunks,
        shards=shards,
        compressors=[COMPRESSOR],
        dimension_names=("c", "z", "y", "x")[-len(shape) :],
        fill_value=0,
        overwrite=True,
        # Every chunk is written, even all-fill ones: a chunk file missing later
        # then means the store lost data (readers check), not "all background".
        config={"write_empty_chunks": True},
    )


def write_array(array: zarr.Array, data: np.ndarray) -> None:
    """Write all of ``data`` into ``array`` in slabs of whole storage objects along axis -3 (Z), cast per slab."""
    rows, axis = storage_unit(array)[-3], array.ndim - 3
    for z0 in range(0, array.shape[axis], rows):
        slab = (slice(None),) * axis + (slice(z0, z0 + rows),)
        array[slab] = np.asarray(data[slab], dtype=array.dtype)


def level_shapes(shape: Sequence[int], factors: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The ``(C, Z, Y, X)`` shape of every level (trailing voxels that fill no block are dropped)."""
    shapes = [tuple(shape)]
    for level in range(1, len(factors)):
        shapes.append((shapes[-1][0], *(n // k for n, k in zip(shapes[-1][1:], _step(factors, level)))))
    return shapes


def create_levels(
    group: zarr.Group, prefix: str, shape: Sequence[int], factors: Sequence[Sequence[int]], spacing: Sequence[float], *, dtype: np.dtype, sharding: Sharding
) -> list[zarr.Array]:
    """Create the empty arrays ``{prefix}{level}`` of a ``(C, Z, Y, X)`` pyramid."""
    chunks = chunk_shape(shape[1:], spacing)
    return [create_array(group, f"{prefix}{level}", level_shape, chunks, dtype=dtype, sharding=sharding) for level, level_shape in enumerate(level_shapes(shape, factors))]


def fill_levels(arrays: Sequence[zarr.Array], data: np.ndarray, factors: Sequence[Sequence[int]], *, label: bool) -> None:
    """Write ``data`` ``(C, Z, Y, X)`` into ``arrays[0]`` and each down-sampled level into the next array.

    Level ``l`` is down-sampled from level ``l - 1``; each level is written in
    slabs of whole storage objects (a chunk row, or the shard), cast per slab.
    """
    level_data = data
    for level, array in enumerate(arrays):
        if level:
            level_data = downsample(level_data, _step(factors, level), label=label)
        write_array(array, level_data)


def write_levels(
    group: zarr.Group,
    prefix: str,
    data: np.ndarray,
    factors: Sequence[Sequence[int]],
    spacing: Sequence[float],
    *,
    dtype: np.dtype,
    label: bool,
    sharding: Sharding,
    bases: Sequence[zarr.Array] | None = None,
    changed: Box | None = None,
    share: Share | None = None,
) -> UnitCounts:
    """Write ``data`` ``(C, Z, Y, X)`` and its down-sampled levels as new arrays ``{prefix}{level}`` of ``dtype``.

    With ``bases`` (a label's previous version) and ``share``, the levels are
    written copy-on-write (:func:`write_arrays`).
    """
    arrays = create_levels(group, prefix, data.shape, factors, spacing, dtype=dtype, sharding=sharding)
    return write_arrays(arrays, data, factors, label=label, bases=bases, changed=changed, share=share)


def write_arrays(
    arrays: Sequence[zarr.Array],
    data: np.ndarray,
    factors: Sequence[Sequence[int]],
    *,
    label: bool,
    bases: Sequence[zarr.Array] | None = None,
    changed: Box | None = None,
    share: Share | None = None,
) -> UnitCounts:
    """Fill new, empty ``arrays`` (a pyramid, or one array) with ``data`` and its down-sampled levels.

    Copy-on-write when ``share`` is given and ``bases`` (the previous version) have the
    same layout, level for level (:func:`update_levels`); every storage object is
    written otherwise. Returns the storage objects written and shared.
    """
    if share is not None and bases is not None and len(bases) == len(arrays) and all(map(same_layout, arrays, bases)):
        counts = UnitCounts()
        try:
            update_levels(arrays, bases, data, factors, changed, share, counts)
            return counts
        except (_Unshareable, SpadkitError):  # the base lacks a file or cannot be read: write in full
            pass  # files already written are replaced, links to the base broken, not overwritten
    fill_levels(arrays, data, factors, label=label)
    return UnitCounts(written=sum(math.prod(-(-n // u) for n, u in zip(a.shape, storage_unit(a))) for a in arrays))


class _Unshareable(Exception):
    """A storage object of the base version does not exist, so it cannot be shared."""


def _share(share: Share, base: zarr.Array, array: zarr.Array, coords: tuple[int, ...]) -> int:
    """Share one storage object (1), or raise :class:`_Unshareable`."""
    if not share(base, array, coords):
        raise _Unshareable(f"{base.path} {coords}")
    return 1


def same_layout(array: zarr.Array, other: zarr.Array) -> bool:
    """True when both arrays store the same voxels in the same files (shape, chunks, shards, dtype, codecs)."""
    mine, theirs = array.metadata.to_dict(), other.metadata.to_dict()
    return all(mine.get(key) == theirs.get(key) for key in ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "codecs", "fill_value"))


def _step(factors: Sequence[Sequence[int]], level: int) -> list[int]:
    """Down-sampling factor of ``level`` relative to ``level - 1``."""
    return [f // p for f, p in zip(factors[level], factors[level - 1])]


def storage_unit(array: zarr.Array) -> tuple[int, ...]:
    """Shape of the array's storage objects: its shards, or its chunks when unsharded."""
    return tuple(array.shards or array.chunks)


# ---------------------------------------------------------------------- copy-on-write


@dataclass
class UnitCounts:
    """Storage objects (chunk or shard files) a copy-on-write save wrote and shared."""

    written: int = 0
    shared: int = 0

    def __iadd__(self, other: UnitCounts) -> UnitCounts:
        self.written += other.written
        self.shared += other.shared
        return self


#: ``share(base, array, coords)``: make the storage object at ``coords`` of ``array`` the same
#: file as that of ``base`` (a hard link); False when ``base`` has no such file.
Share = Callable[[zarr.Array, zarr.Array, tuple[int, ...]], bool]


def update_levels(
    arrays: Sequence[zarr.Array],
    bases: Sequence[zarr.Array],
    data: np.ndarray,
    factors: Sequence[Sequence[int]],
    changed: Box | None,
    share: Share,
    counts: UnitCounts,
) -> None:
    """Fill the new, empty level ``arrays`` with ``data`` and its pyramid, writing only what differs from ``bases``.

    ``bases`` are the previous version's arrays, of the same layout. Storage objects
    equal to the base's are shared (``share``), the others written. Only level 0
    is compared voxel by voxel (inside ``changed`` when given: ``data`` equals
    ``bases[0]`` outside it); each coarser level is recomputed only over the
    blocks above the voxels that changed on the finer level.

    Args:
        arrays: the new version's levels ``(C, Z, Y, X)``, created by :func:`create_levels`.
        bases: the previous version's levels.
        data: the new level 0 ``(C, Z, Y, X)``.
        factors: per-level factors (``pyramid_factors``); one entry for a single level.
        changed: ``[lo, hi)`` per axis of ``data`` outside which it equals ``bases[0]``; None: everywhere.
        share: links a storage object of the base into the new array.
        counts: updated with the storage objects written and shared.
    """
    box: Box | None = tuple((0, n) for n in arrays[0].shape) if changed is None else _expand(changed, storage_unit(arrays[0]), arrays[0].shape)
    if any(lo >= hi for lo, hi in box):
        box = None  # an empty hint: nothing changed
    fresh = data if box is None else data[_slices(box)]
    for level, (array, base) in enumerate(zip(arrays, bases)):
        if level and box is not None:
            step = (1, *_step(factors, level))
            box = tuple((lo // k, min(-(-hi // k), n)) for (lo, hi), k, n in zip(box, step, array.shape))
            source = data if level == 1 else arrays[level - 1]
            fresh = downsample(np.asarray(source[_slices(tuple((lo * k, hi * k) for (lo, hi), k in zip(box, step)))]), step[1:], label=True)
        box = _update_level(array, base, box, fresh, share, counts)


def _update_level(array: zarr.Array, base: zarr.Array, box: Box | None, fresh: np.ndarray, share: Share, counts: UnitCounts) -> Box | None:
    """Make ``array`` hold ``base`` with ``fresh`` pasted over ``box``; return the bounding box of the voxels that differ.

    Storage objects that ``box`` does not touch, or whose voxels inside ``box`` equal
    ``fresh``, are shared with ``base``; the others are written. Only ``box`` is
    compared (one row of storage objects along Z at a time); the base is read again
    in full only for objects that differ and reach outside ``box``.
    """
    unit = storage_unit(array)
    touched = [range(0)] * array.ndim if box is None else [range(lo // u, -(-hi // u)) for (lo, hi), u in zip(box, unit)]
    inside = set(itertools.product(*touched))
    for coords in itertools.product(*(range(-(-n // u)) for n, u in zip(array.shape, unit))):
        if coords not in inside:
            counts.shared += _share(share, base, array, coords)
    differ = [(n, 0) for n in array.shape]
    z_axis = array.ndim - 3
    for row in touched[z_axis] if inside else ():
        writes = []
        ranges = [*touched[:z_axis], range(row, row + 1), *touched[z_axis + 1 :]]
        region = tuple((max(r[0] * u, lo), min((r[-1] + 1) * u, hi)) for r, u, (lo, hi) in zip(ranges, unit, box))  # within box
        new = fresh[_slices(region, box)]
        diff = np.asarray(base[_slices(region)]) != new
        for coords in itertools.product(*ranges):
            part = _unit_box(coords, unit, array.shape)
            overlap = tuple((max(a, lo), min(b, hi)) for (a, b), (lo, hi) in zip(part, region))
            if not diff[_slices(overlap, region)].any():
                counts.shared += _share(share, base, array, coords)
                continue
            if overlap == part:
                content = new[_slices(part, region)]
            else:
                content = np.asarray(base[_slices(part)])
                content[_slices(overlap, part)] = new[_slices(overlap, region)]
            writes.append(array._async_array.setitem(_slices(part), content))  # zarr's own async API of the array
        sync(_gather(writes))  # the row's differing storage objects, encoded and written concurrently
        counts.written += len(writes)
        if diff.any():
            differ = [(min(d[0], lo + idx[0]), max(d[1], lo + idx[-1] + 1)) for d, (lo, _), idx in zip(differ, region, _nonzero_extent(diff))]
    return None if differ[0][0] >= differ[0][1] else tuple(differ)


async def _gather(coroutines: Sequence[Coroutine[Any, Any, Any]]) -> None:
    await asyncio.gather(*coroutines)


def _nonzero_extent(mask: np.ndarray) -> list[np.ndarray]:
    """Per axis, the indices where ``mask`` has any True (in the other axes)."""
    return [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))) for axis in range(mask.ndim)]


def _unit_box(coords: Sequence[int], unit: Sequence[int], shape: Sequence[int]) -> Box:
    return tuple((c * u, min((c + 1) * u, n)) for c, u, n in zip(coords, unit, shape))


def _expand(box: Box, unit: Sequence[int], shape: Sequence[int]) -> Box:
    """``box`` grown to whole storage objects."""
    return tuple(((lo // u) * u, min(-(-hi // u) * u, n)) for (lo, hi), u, n in zip(box, unit, shape))


def _slices(box: Box, origin: Box | None = None) -> tuple[slice, ...]:
    """Slices of ``box``, relative to the start of ``origin`` when given."""
    starts = [0] * len(box) if origin is None else [lo for lo, _ in origin]
    return tuple(slice(lo - s, hi - s) for (lo, hi), s in zip(box, starts))


def level_affine(affine0: np.ndarray, factor_zyx: Sequence[int]) -> np.ndarray:
    """Affine of a pyramid level down-sampled by ``factor_zyx`` (its voxels are block centres)."""
    factor_xyz = np.asarray(factor_zyx[::-1], dtype=float)
    affine = affine0.copy()
    affine[:3, :3] = affine0[:3, :3] * factor_xyz
    affine[:3, 3] = affine0[:3, :3] @ ((factor_xyz - 1) / 2) + affine0[:3, 3]
    return affine
