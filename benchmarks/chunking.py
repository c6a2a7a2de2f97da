"""Benchmark zarr v3 chunk / shard / codec layouts for random 3D patch reads.

The training patch reader slices the zarr array directly
(``arr[z0:z1, y0:y1, x0:x1]``, no Dask), so this script times exactly that on
real data for every candidate on-disk layout:

* ``mni152``: nilearn's bundled MNI152 T1 template at 1 mm (197 x 233 x 189),
  stored on disk as uint8; its stored integer values are written as int16, as
  a CT store would hold them. The template is skull-stripped, so ~78 % of its
  voxels are 0 (the fill value) and zarr skips writing all-zero chunks.
* ``ct_like``: the same template tiled and cropped to 300 x 512 x 512 int16 and
  offset by -1024 so the background sits at air (-1024 HU) as in a CT: no chunk
  equals the fill value, so every chunk is written, as in a real CT store.

For each layout and volume the script reports write time, bytes and files on
disk, compression ratio, the decoded/needed voxel ratio of a patch read, and
the latency of random 96^3 patch reads with one thread and with two threads
(blosc releases the GIL). Patch corners are seeded and identical for every
layout. Reads are warm-cache: the OS page cache cannot be dropped without
root, so every store is read right after it is written; a fresh zarr array
object is opened per layout.

Usage::

    python benchmarks/chunking.py --reads 60 --out benchmarks/results/chunking.json

The bar chart is written next to the JSON file with a ``.png`` suffix.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import psutil
import zarr
from _machine import cpu_model
from matplotlib.figure import Figure
from nilearn import datasets
from zarr.codecs import BloscCodec

PATCH_EDGE = 96
"""Edge length of the cubic training patch, in voxels."""
WARMUP_READS = 5
"""Untimed reads before timing each layout."""
CT_LIKE_SHAPE = (300, 512, 512)
"""Shape (z, y, x) of the CT-like volume, in voxels."""
AIR_HU = -1024
"""Offset added to the CT-like volume so its background is air, in HU."""
MNI_STORED_MAX = 255
"""Largest stored uint8 value of the MNI152 file; nilearn rescales it to 1.0."""

Corner = tuple[int, int, int]
Metrics = dict[str, float | int]


@dataclass(frozen=True)
class Layout:
    """One candidate on-disk layout of a 3D zarr v3 array.

    Attributes:
        name: short label used in the JSON file and the plot.
        chunk_edge: edge length of the cubic (inner) chunk, in voxels.
        codec: "lz4" or "zstd" (blosc, byte shuffle, level 5) or "none".
        sharded: whether all chunks go into a single shard per volume.
    """

    name: str
    chunk_edge: int
    codec: str
    sharded: bool = False

    @property
    def chunks(self) -> tuple[int, int, int]:
        """Chunk shape, in voxels."""
        return (self.chunk_edge,) * 3

    def compressors(self) -> BloscCodec | None:
        """The zarr compressor of this layout (None for uncompressed)."""
        if self.codec == "none":
            return None
        return BloscCodec(cname=self.codec, clevel=5, shuffle="shuffle")

    def shards(self, shape: Sequence[int]) -> tuple[int, ...] | None:
        """Shard shape: the array shape rounded up to whole chunks, or None."""
        if not self.sharded:
            return None
        edge = self.chunk_edge
        return tuple(-(-size // edge) * edge for size in shape)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description of the layout."""
        return {"chunks": list(self.chunks), "codec": self.codec, "sharded": self.sharded}


LAYOUTS = (
    Layout("chunk32_lz4", 32, "lz4"),
    Layout("chunk64_lz4", 64, "lz4"),
    Layout("chunk128_lz4", 128, "lz4"),
    Layout("chunk64_lz4_shard", 64, "lz4", sharded=True),
    Layout("chunk64_zstd", 64, "zstd"),
    Layout("chunk64_raw", 64, "none"),
)


def load_mni152_int16() -> np.ndarray:
    """MNI152 T1 template at 1 mm as its stored uint8 values (0..255), cast to int16."""
    image = datasets.load_mni152_template(resolution=1)
    scaled = np.asarray(image.dataobj, dtype=np.float32)  # nilearn maps 0..255 to 0..1
    return np.rint(scaled * MNI_STORED_MAX).astype(np.int16)


def make_ct_like(template: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Tile ``template`` to cover ``shape``, crop, and shift the background to air (HU)."""
    reps = [-(-target // size) for target, size in zip(shape, template.shape, strict=True)]
    tiled = np.tile(template, reps)[tuple(slice(0, n) for n in shape)]
    return (tiled + AIR_HU).astype(np.int16)


def random_corners(shape: Sequence[int], count: int, seed: int) -> list[Corner]:
    """``count`` uniform random patch corners with the whole patch inside ``shape``."""
    rng = np.random.default_rng(seed)
    highs = [size - PATCH_EDGE + 1 for size in shape]
    return [tuple(int(rng.integers(0, high)) for high in highs) for _ in range(count)]


def patch_slices(corner: Corner) -> tuple[slice, slice, slice]:
    """Index expression of the patch starting at ``corner``."""
    return tuple(slice(c, c + PATCH_EDGE) for c in corner)


def decoded_over_needed(corner: Corner, chunk_edge: int) -> float:
    """Voxels in all chunks a patch touches divided by voxels in the patch.

    Geometric read amplification: it counts every touched chunk, including
    chunks absent from disk because they equal the fill value.
    """
    touched = 1
    for start in corner:
        touched *= (start + PATCH_EDGE - 1) // chunk_edge - start // chunk_edge + 1
    return touched * chunk_edge**3 / PATCH_EDGE**3


def disk_usage(path: Path) -> tuple[int, int]:
    """Total file size (bytes) and number of files under ``path``, metadata included."""
    sizes = [file.stat().st_size for file in path.rglob("*") if file.is_file()]
    return sum(sizes), len(sizes)


def write_array(path: Path, data: np.ndarray, layout: Layout) -> float:
    """Create the zarr v3 array of ``layout`` at ``path`` and fill it; returns seconds."""
    start = time.perf_counter()
    array = zarr.create_array(
        zarr.storage.LocalStore(path),
        shape=data.shape,
        chunks=layout.chunks,
        shards=layout.shards(data.shape),
        compressors=layout.compressors(),
        dtype=data.dtype,
    )
    array[...] = data
    return time.perf_counter() - start


def timed_read(array: zarr.Array, corner: Corner) -> float:
    """Read one patch with ``array[...]``; returns the latency in ms."""
    start = time.perf_counter()
    array[patch_slices(corner)]
    return (time.perf_counter() - start) * 1e3


@dataclass(frozen=True)
class ReadRun:
    """Outcome of one batch of patch reads.

    Attributes:
        latencies_ms: latency of every read, in ms.
        wall_s: wall time of the whole batch, in s.
        cpu_s: CPU time of the whole process (all threads) over the batch, in s.
    """

    latencies_ms: list[float]
    wall_s: float
    cpu_s: float


def run_reads(read: Callable[[Corner], float], corners: Sequence[Corner], threads: int) -> ReadRun:
    """Run ``read`` over ``corners`` from ``threads`` caller threads."""
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    if threads == 1:
        latencies = [read(corner) for corner in corners]
    else:
        with ThreadPoolExecutor(threads) as pool:
            latencies = list(pool.map(read, corners))
    return ReadRun(latencies, time.perf_counter() - wall_start, time.process_time() - cpu_start)


def benchmark_layout(
    root: Path, data: np.ndarray, layout: Layout, warmup: Sequence[Corner], timed: Sequence[Corner]
) -> Metrics:
    """Write ``data`` with ``layout`` under ``root`` and time random patch reads."""
    path = root / layout.name
    write_s = write_array(path, data, layout)
    nbytes, nfiles = disk_usage(path)

    array = zarr.open_array(zarr.storage.LocalStore(path, read_only=True), mode="r")
    np.testing.assert_array_equal(array[patch_slices(timed[0])], data[patch_slices(timed[0])])
    read = partial(timed_read, array)
    run_reads(read, warmup, threads=1)
    single = run_reads(read, timed, threads=1)
    dual = run_reads(read, timed, threads=2)
    single_ms = single.latencies_ms

    return {
        "write_s": round(write_s, 3),
        "bytes_on_disk": nbytes,
        "files_on_disk": nfiles,
        "compression_ratio": round(data.nbytes / nbytes, 2),
        "decoded_over_needed_voxels": round(
            statistics.fmean(decoded_over_needed(c, layout.chunk_edge) for c in timed), 2
        ),
        "ms_per_patch_median": round(statistics.median(single_ms), 2),
        "ms_per_patch_mean": round(statistics.fmean(single_ms), 2),
        "ms_per_patch_p25": round(float(np.percentile(single_ms, 25)), 2),
        "ms_per_patch_p75": round(float(np.percentile(single_ms, 75)), 2),
        "patches_per_s": round(len(timed) / single.wall_s, 1),
        "cores_busy": round(single.cpu_s / single.wall_s, 2),
        "threads2_ms_per_patch_median": round(statistics.median(dual.latencies_ms), 2),
        "threads2_patches_per_s": round(len(timed) / dual.wall_s, 1),
        "threads2_cores_busy": round(dual.cpu_s / dual.wall_s, 2),
        "threads2_speedup": round(single.wall_s / dual.wall_s, 2),
    }


def load_volumes(include_ct_like: bool) -> dict[str, np.ndarray]:
    """The benchmark volumes by name, all int16, 1 mm isotropic."""
    mni = load_mni152_int16()
    volumes = {"mni152": mni}
    if include_ct_like:
        volumes["ct_like"] = make_ct_like(mni, CT_LIKE_SHAPE)
    return volumes


def settings(args: argparse.Namespace, volumes: dict[str, np.ndarray]) -> dict[str, Any]:
    """Machine, library versions and benchmark parameters for the JSON file."""
    return {
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_count_logical": os.cpu_count(),
            "cpu_count_physical": psutil.cpu_count(logical=False),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
        },
        "versions": {
            "python": platform.python_version(),
            "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__,
            "numpy": np.__version__,
        },
        "zarr_async_concurrency": zarr.config.get("async.concurrency"),
        "patch_shape": [PATCH_EDGE] * 3,
        "reads": args.reads,
        "warmup_reads": WARMUP_READS,
        "threads_concurrent": 2,
        "seed": args.seed,
        "volumes": {
            name: {"shape": list(data.shape), "dtype": str(data.dtype), "spacing_mm": [1.0] * 3}
            for name, data in volumes.items()
        },
        "cache": "warm OS page cache: each store is read right after being written",
        "notes": [
            "mni152 is skull-stripped (~78% zeros); all-zero chunks are not written, "
            "so its files and bytes are lower and its reads faster than a CT's",
            "ct_like background is -1024 (air), so every chunk is written",
            "bytes_on_disk and files_on_disk include zarr.json",
            "decoded_over_needed_voxels counts every touched (inner) chunk",
            "ms_per_patch_* and patches_per_s are single-threaded; threads2_* use "
            "ThreadPoolExecutor(2) over the same corners",
            "cores_busy = process CPU time / wall time over the timed reads; above 1 "
            "means zarr already decodes chunks in parallel inside one arr[...] call",
        ],
    }


def plot(
    results: dict[str, dict[str, Any]], shapes: dict[str, tuple[int, ...]], path: Path
) -> None:
    """Grouped bar chart of median ms/patch (IQR whiskers), one group per volume."""
    volume_names = list(shapes)
    n_layouts = len(results)
    width = 0.8 / n_layouts
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.subplots()
    for i, (name, entry) in enumerate(results.items()):
        metrics = [entry["volumes"][v] for v in volume_names]
        medians = [m["ms_per_patch_median"] for m in metrics]
        whiskers = [
            [m["ms_per_patch_median"] - m["ms_per_patch_p25"] for m in metrics],
            [m["ms_per_patch_p75"] - m["ms_per_patch_median"] for m in metrics],
        ]
        x = np.arange(len(volume_names)) + (i - (n_layouts - 1) / 2) * width
        bars = ax.bar(x, medians, width, yerr=whiskers, capsize=3, label=name)
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    ax.set_xticks(np.arange(len(volume_names)))
    ax.set_xticklabels([f"{v}\n{' x '.join(map(str, shape))} int16" for v, shape in shapes.items()])
    ax.set_xlabel("Volume")
    ax.set_ylabel("Median read time per patch (ms, whiskers: IQR)")
    ax.set_title(f"Random {PATCH_EDGE}³ int16 patch reads from zarr v3, 1 thread, warm cache")
    ax.legend(title="Layout (chunk edge, codec)", fontsize=9, ncols=2)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=60, help="timed patch reads per layout")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/chunking.json"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the patch corners")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="parent of the temporary stores (default: system temp dir)",
    )
    parser.add_argument(
        "--skip-ct-like",
        action="store_true",
        help=f"benchmark only the MNI152 volume, not the {CT_LIKE_SHAPE} one",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run every layout on every volume and write the JSON and PNG results."""
    args = parse_args(argv)
    volumes = load_volumes(include_ct_like=not args.skip_ct_like)
    results: dict[str, dict[str, Any]] = {
        layout.name: {**layout.describe(), "volumes": {}} for layout in LAYOUTS
    }
    with tempfile.TemporaryDirectory(prefix="spadkit-chunking-", dir=args.workdir) as tmp:
        for volume_name, data in volumes.items():
            corners = random_corners(data.shape, WARMUP_READS + args.reads, args.seed)
            warmup, timed = corners[:WARMUP_READS], corners[WARMUP_READS:]
            for layout in LAYOUTS:
                metrics = benchmark_layout(Path(tmp) / volume_name, data, layout, warmup, timed)
                results[layout.name]["volumes"][volume_name] = metrics
                print(
                    f"{volume_name:8s} {layout.name:18s} "
                    f"{metrics['ms_per_patch_median']:8.2f} ms  "
                    f"{metrics['patches_per_s']:7.1f} patch/s  "
                    f"{metrics['bytes_on_disk'] / 1e6:8.2f} MB  "
                    f"{metrics['files_on_disk']:5d} files  x{metrics['compression_ratio']}",
                    flush=True,
                )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"layouts": results, "settings": settings(args, volumes)}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    shapes = {name: data.shape for name, data in volumes.items()}
    plot(results, shapes, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
