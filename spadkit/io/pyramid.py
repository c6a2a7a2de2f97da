"""Resolution pyramids of the store: chunk shapes, level factors, down-sampling and writing.

Each level is computed from the previous one (factor 1 or 2 per axis), slab
by slab, so writing a case needs little memory beyond the level-0 array:
images take the block mean, labels the block mode (the most frequent value,
ties to the smallest), so that every level's voxels sit at the block centres
that its affine (:func:`level_affine`) and the NGFF translation describe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec

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


def create_array(group: zarr.Group, path: str, shape: Sequence[int], chunks: Sequence[int], *, dtype: np.dtype, sharded: bool) -> zarr.Array:
    """Create (replacing) the array ``path`` of ``group`` as the store keeps every array: blosc-lz4,
    fill 0, every chunk written; axes ``(c, z, y, x)`` (or the last ``len(shape)`` of them).

    ``chunks`` are clamped to ``shape``. A sharded array is one shard per array (``sharded``).
    """
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    shards = tuple(math.ceil(s / c) * c for s, c in zip(shape, chunks)) if sharded else None
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
    rows, axis = (array.shards or array.chunks)[-3], array.ndim - 3
    for z0 in range(0, array.shape[axis], rows):
        slab = (slice(None),) * axis + (slice(z0, z0 + rows),)
        array[slab] = np.asarray(data[slab], dtype=array.dtype)


def write_levels(
    group: zarr.Group,
    prefix: str,
    data: np.ndarray,
    factors: Sequence[Sequence[int]],
    spacing: Sequence[float],
    *,
    dtype: np.dtype,
    label: bool,
    sharded: bool,
) -> None:
    """Write ``data`` ``(C, Z, Y, X)`` and its down-sampled levels as arrays ``{prefix}{level}`` of ``dtype``.

    Level ``l`` is down-sampled from level ``l - 1``; each level is written in
    slabs of whole storage objects (a chunk row, or the shard), cast per slab.
    """
    chunks = chunk_shape(data.shape[1:], spacing)
    level_data = data
    for level, factor in enumerate(factors):
        if level:
            step = [f // p for f, p in zip(factor, factors[level - 1])]
            level_data = downsample(level_data, step, label=label)
        write_array(create_array(group, f"{prefix}{level}", level_data.shape, chunks, dtype=dtype, sharded=sharded), level_data)


def level_affine(affine0: np.ndarray, factor_zyx: Sequence[int]) -> np.ndarray:
    """Affine of a pyramid level down-sampled by ``factor_zyx`` (its voxels are block centres)."""
    factor_xyz = np.asarray(factor_zyx[::-1], dtype=float)
    affine = affine0.copy()
    affine[:3, :3] = affine0[:3, :3] * factor_xyz
    affine[:3, 3] = affine0[:3, :3] @ ((factor_xyz - 1) / 2) + affine0[:3, 3]
    return affine
