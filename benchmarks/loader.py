"""Benchmark training-patch loaders: spadkit's PatchStream against TorchIO, MONAI and numpy.

Every loader delivers the same thing: batches of 2 random 96^3 patches,
``(2, 1, 96, 96, 96)`` float32 tensors with intensities clipped to the case's
0.5-99.5 percentiles and scaled to [0, 1], with volumes shorter than 96 voxels
along an axis padded with background (0 after scaling). Each volume gives 8
patches per visit. The loaders:

* ``spadkit``: ``PatchStream`` over the OME-Zarr store, read by W threads in the
  consuming process (no batch crosses a process boundary).
* ``spadkit_workers``: the same stream with one reader thread, behind
  ``stream.loader(num_workers=W)`` (a DataLoader with W worker processes).
* ``spadkit_nocache``: ``spadkit`` with its decoded-chunk cache off
  (``cache_bytes=0``), a reference row: the default 512 MB cache holds this whole
  small dataset decoded (~90 MB) after one epoch, while TorchIO and MONAI
  decompress and scale the NIfTI file on every visit. Every patch decodes its
  chunks here, as when a dataset is much larger than the cache and no patch of
  the same visit shares them. It is not used in the ratios.
* ``spadkit_smallcache``: ``spadkit`` with a 32 MB cache, about a third of the
  decoded dataset: chunks are evicted and decoded again, and only the patches of
  one visit (and of the interleaved groups) share them, as on a dataset larger
  than the cache.
* ``torchio``: ``tio.Queue`` (``UniformSampler``, W subject-loading workers,
  shuffled) with ``RescaleIntensity`` and padding to >= 96, popped by a
  ``DataLoader(queue, batch_size=2, num_workers=0)`` as TorchIO documents.
* ``monai``: ``LoadImaged -> EnsureChannelFirstd -> ScaleIntensityRangePercentilesd
  -> SpatialPadd -> RandSpatialCropSamplesd(num_samples=8)`` in a MONAI ``Dataset``
  and ``DataLoader`` with W workers. One item holds all 8 crops of a volume, so a
  loader batch (``batch_size=1``) holds 8 patches; it is split into 4 batches of 2
  in the consuming process (views, no copy).
* ``numpy_ram``: the upper bound: every volume pre-loaded, pre-scaled and padded
  as float32 numpy in RAM; random crops stacked into a batch in the main
  process, one thread.

Data: nilearn's MNI152 T1 (1 mm, stored as int16) in ``COPIES`` copies, each
shifted by a few voxels along x, plus ``COPIES`` copies resampled (order 1) to
1 x 1 x 3 mm (64 slices, so patches there need padding). The NIfTI files are
gzip-compressed as datasets are usually distributed; the OME-Zarr store is
written from them by ``spadkit.ingest.ingest``. Both are rebuilt in ``--work``
at the start of every run.

Method: every loader runs in a fresh subprocess (this script with ``--run-one``)
so that imports, caches and memory do not leak between loaders; the child
prints its result as one JSON line. In the child, ``torch.set_num_threads(W)``;
batches are consumed until ``WARMUP_S`` have passed and at least
``WARMUP_BATCHES`` arrived (untimed: worker start-up, first file reads), then
counted for ``--seconds``. Consumption is cheap on purpose (the patch count of
the batch); warm-up batches are checked for shape, dtype and value range.
One epoch is one pass of each loader's own iterator (8 cases x 8 patches); the
next epoch starts a fresh iterator, so loaders with worker processes re-start
them each epoch, as they do in training. A background thread samples memory
every ``SAMPLE_INTERVAL_S`` over the child process and all its descendants:
PSS (proportional set size: pages shared after fork are split between the
processes, not counted again) and RSS (what ``top`` shows, double-counting
shared pages). Peaks cover loader construction, warm-up and the timed part;
``baseline_*`` is the child after importing torch, ``built_*`` after the loader
was built. Over the timed part the child also records ``cores_busy`` (CPU time
of its process tree / wall time) and ``other_cores_busy`` (everything else on
the machine: interference). Before each child starts, the parent waits (up to
``--max-wait`` s) until the rest of the machine is nearly idle. With
``--repeats R`` the loaders run in R interleaved rounds and each reports its run
with the least interference and the highest peak memory of all its runs (all
runs are kept under ``runs``). A child that
runs past its time limit is killed with its process group.

Usage::

    python benchmarks/loader.py --seconds 20 --repeats 3 --out benchmarks/results/loader.json

(``--repeats 3`` because this 2-core machine is shared: see ``other_cores_busy``.)

The bar chart is written next to the JSON file with a ``.png`` suffix.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _large
import numpy as np
import psutil
from _machine import package_version

PATCH_EDGE = 96
"""Edge length of the cubic training patch, in voxels."""
BATCH_SIZE = 2
"""Patches per training batch."""
SAMPLES_PER_VOLUME = 8
"""Patches drawn from a volume per visit (TorchIO ``samples_per_volume``)."""
QUEUE_LENGTH = 24
"""TorchIO ``Queue(max_length=...)``: patches held in the queue (3 volumes' worth)."""
PERCENTILES = (0.5, 99.5)
"""Intensity percentiles mapped to 0 and 1 (values outside are clipped)."""
COPIES = 4
"""Copies of the template at each spacing."""
SHIFT_VOXELS = 2
"""Copy ``k`` is rolled by ``k * SHIFT_VOXELS`` voxels along x."""
THICK_SPACING_MM = (1.0, 1.0, 3.0)
"""Voxel size (x, y, z) of the thick-slice copies, in mm."""
WARMUP_S = 2.0
"""Untimed seconds at the start of each loader, in s."""
WARMUP_BATCHES = 3
"""Untimed batches at the start of each loader (at least)."""
SAMPLE_INTERVAL_S = 0.1
"""Period of the memory sampler, in s."""
SETUP_ALLOWANCE_S = 180.0
"""Time a child may take beyond ``--seconds`` (imports, loading, warm-up) before it is killed, in s."""
SEED = 0
"""Seed of every loader's random patch positions."""
QUIET_CORES = 0.3
"""Other processes must use fewer cores than this (over ``QUIET_PROBE_S``) before a loader starts."""
QUIET_PROBE_S = 2.0
"""Length of one quiet-machine probe, in s."""
RESULT_PREFIX = "LOADER-RESULT "
"""Marks the child's result line on its stdout (libraries may print other lines)."""

LOADERS = ("spadkit", "spadkit_workers", "spadkit_smallcache", "spadkit_nocache", "torchio", "monai", "numpy_ram")
"""Loader names, in the order they run and are plotted."""
PEERS = ("torchio", "monai")
SMALL_CACHE_MB = 32
"""Chunk cache of the ``spadkit_smallcache`` row, in MB (the decoded dataset is ~90 MB)."""
"""Loaders spadkit is compared with."""

EpochFactory = Callable[[], Iterable[Any]]
"""Returns an iterable over one epoch of image batches (tensors ``(n, 1, 96, 96, 96)``)."""


def labels(workers: int) -> dict[str, str]:
    """Readable name of every loader, for the JSON file and the plot."""
    return {
        "spadkit": f"spadkit ({workers} threads in-process)",
        "spadkit_workers": f"spadkit ({workers} worker processes)",
        "spadkit_smallcache": f"spadkit ({workers} threads, cache {SMALL_CACHE_MB} MB < data)",
        "spadkit_nocache": f"spadkit ({workers} threads, chunk cache off)",
        "torchio": f"TorchIO Queue ({workers} workers)",
        "monai": f"MONAI DataLoader ({workers} workers)",
        "numpy_ram": "numpy in-RAM (1 thread, upper bound)",
    }


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Dataset:
    """The benchmark files in the work folder.

    Attributes:
        nifti: the NIfTI files (``.nii.gz``, int16), sorted.
        store: the spadkit OME-Zarr store holding the same cases.
    """

    nifti: list[Path]
    store: Path


def dataset_paths(work: Path) -> Dataset:
    """Paths of the benchmark data inside ``work`` (whether built or not)."""
    return Dataset(sorted((work / "nifti").glob("*.nii.gz")), work / "spadkit.zarr")


def template_int16() -> Any:
    """nilearn's MNI152 T1 (1 mm) as a nibabel image with int16 voxels (stored values 0..255)."""
    import nibabel as nib

    from spadkit.demo import nilearn_file

    image = nib.load(nilearn_file("t1"))
    data = np.asanyarray(image.dataobj).astype(np.int16)
    return nib.Nifti1Image(data, image.affine)


def shifted(image: Any, voxels: int) -> Any:
    """A copy of a nibabel image with its voxels rolled by ``voxels`` along the first axis (x)."""
    import nibabel as nib

    data = np.roll(np.asanyarray(image.dataobj), voxels, axis=0)
    return nib.Nifti1Image(data, image.affine)


def build_dataset(work: Path) -> Dataset:
    """Write the NIfTI copies and ingest them into a spadkit store under ``work`` (rebuilt)."""
    import nibabel as nib
    import nibabel.processing

    from spadkit.ingest import ingest

    for sub in ("nifti", "spadkit.zarr"):
        shutil.rmtree(work / sub, ignore_errors=True)
    (work / "nifti").mkdir(parents=True)
    fine = template_int16()
    thick = nibabel.processing.resample_to_output(fine, voxel_sizes=THICK_SPACING_MM, order=1)
    for k in range(COPIES):
        nib.save(shifted(fine, k * SHIFT_VOXELS), work / "nifti" / f"mni152_1mm_{k}.nii.gz")
        nib.save(shifted(thick, k * SHIFT_VOXELS), work / "nifti" / f"mni152_1x1x3mm_{k}.nii.gz")
    data = dataset_paths(work)
    report = ingest(work / "nifti", str(data.store), layout="flat", modality="MR", progress=False)
    if not report.ok:
        raise RuntimeError(report.summary())
    return data


def describe_cases(data: Dataset) -> list[dict[str, Any]]:
    """File name, shape (x, y, z voxels), spacing (mm) and dtype of every NIfTI case."""
    import nibabel as nib

    cases = []
    for path in data.nifti:
        image = nib.load(path)
        cases.append(
            {
                "file": path.name,
                "shape_xyz": list(image.shape),
                "spacing_xyz_mm": [float(z) for z in image.header.get_zooms()],
                "dtype": str(image.get_data_dtype()),
            }
        )
    return cases


# --------------------------------------------------------------------------- loaders


def make_stream(data: Dataset, threads: int, **options: Any) -> Any:
    """The spadkit ``PatchStream`` of this benchmark, with ``threads`` reader threads per process."""
    from spadkit.data import PatchSize, PatchStream

    return PatchStream(
        [str(data.store)],
        patch_size=PatchSize(voxels=PATCH_EDGE, spacing_aware=False),
        batch_size=BATCH_SIZE,
        samples_per_case=SAMPLES_PER_VOLUME,
        num_threads=threads,
        seed=SEED,
        **options,
    )


def spadkit_epochs(
    data: Dataset, workers: int, cache_bytes: int | None = None
) -> tuple[EpochFactory, Callable[[], dict[str, Any]]]:
    """spadkit ``PatchStream`` read by ``workers`` threads in this process.

    ``cache_bytes`` bounds the decoded-chunk cache, in bytes (None: spadkit's
    default; 0: off). Returns the epoch factory and a function giving the
    chunk-cache statistics (MB held, hits, misses).
    """
    options = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
    stream = make_stream(data, workers, **options)

    def cache_stats() -> dict[str, Any]:
        cache = stream.cache
        return {
            "cache_mb": round(cache.nbytes / 2**20, 1),
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
        }

    return (lambda: (batch["image"] for batch in stream)), cache_stats


def spadkit_worker_epochs(data: Dataset, workers: int) -> EpochFactory:
    """spadkit ``PatchStream`` (one reader thread each) in ``workers`` DataLoader processes."""
    loader = make_stream(data, 1).loader(num_workers=workers)
    return lambda: (batch["image"] for batch in loader)


def pad_to_patch(tensor: Any) -> Any:
    """Pad a ``(C, X, Y, Z)`` tensor at the end of every spatial axis shorter than a patch, with 0."""
    import torch

    short = [max(PATCH_EDGE - n, 0) for n in tensor.shape[1:]]
    if not any(short):
        return tensor
    # torch pads the last axis first: (z_lo, z_hi, y_lo, y_hi, x_lo, x_hi)
    return torch.nn.functional.pad(tensor, (0, short[2], 0, short[1], 0, short[0]))


def torchio_epochs(data: Dataset, workers: int) -> EpochFactory:
    """TorchIO ``Queue`` with ``workers`` subject-loading processes, popped by a plain DataLoader."""
    import torchio as tio
    from torch.utils.data import DataLoader

    transform = tio.Compose(
        [
            tio.RescaleIntensity(out_min_max=(0, 1), percentiles=PERCENTILES),
            tio.Lambda(pad_to_patch),
        ]
    )
    subjects = [tio.Subject(image=tio.ScalarImage(path)) for path in data.nifti]
    queue = tio.Queue(
        tio.SubjectsDataset(subjects, transform=transform),
        max_length=QUEUE_LENGTH,
        samples_per_volume=SAMPLES_PER_VOLUME,
        sampler=tio.UniformSampler(PATCH_EDGE),
        num_workers=workers,
        shuffle_subjects=True,
        shuffle_patches=True,
    )
    loader = DataLoader(queue, batch_size=BATCH_SIZE, num_workers=0)
    return lambda: (batch["image"][tio.DATA] for batch in loader)


def monai_epochs(data: Dataset, workers: int) -> EpochFactory:
    """MONAI ``Dataset`` + ``DataLoader`` with ``workers`` processes; 8-patch items split into batches of 2."""
    import torch
    from monai import transforms as mt
    from monai.data import DataLoader
    from monai.data import Dataset as MonaiDataset

    keys = ["image"]
    transform = mt.Compose(
        [
            mt.LoadImaged(keys),
            mt.EnsureChannelFirstd(keys),
            mt.ScaleIntensityRangePercentilesd(
                keys, lower=PERCENTILES[0], upper=PERCENTILES[1], b_min=0.0, b_max=1.0, clip=True
            ),
            mt.SpatialPadd(keys, spatial_size=(PATCH_EDGE,) * 3),
            mt.RandSpatialCropSamplesd(
                keys, roi_size=(PATCH_EDGE,) * 3, num_samples=SAMPLES_PER_VOLUME, random_size=False
            ),
        ]
    )
    transform.set_random_state(seed=SEED)
    dataset = MonaiDataset([{"image": str(path)} for path in data.nifti], transform=transform)
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=workers)

    def epoch() -> Iterator[Any]:
        for batch in loader:
            yield from torch.split(batch["image"], BATCH_SIZE)

    return epoch


def load_scaled(path: Path) -> np.ndarray:
    """A NIfTI volume as float32 ``(X, Y, Z)``, percentile-scaled to [0, 1] and padded to >= a patch."""
    import nibabel as nib

    volume = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    low, high = np.percentile(volume, PERCENTILES)
    volume = np.clip((volume - low) / (high - low), 0.0, 1.0, out=volume)
    pad = [(0, max(PATCH_EDGE - n, 0)) for n in volume.shape]
    return np.pad(volume, pad) if any(p[1] for p in pad) else volume


def random_crop(volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A view of a uniformly random ``PATCH_EDGE``^3 window of ``volume``."""
    corner = [int(rng.integers(0, n - PATCH_EDGE + 1)) for n in volume.shape]
    return volume[tuple(slice(c, c + PATCH_EDGE) for c in corner)]


def numpy_epochs(data: Dataset) -> EpochFactory:
    """The in-RAM upper bound: random crops of pre-scaled float32 volumes, stacked in this thread."""
    import torch

    volumes = [load_scaled(path) for path in data.nifti]
    rng = np.random.default_rng(SEED)
    batches_per_epoch = len(volumes) * SAMPLES_PER_VOLUME // BATCH_SIZE

    def epoch() -> Iterator[Any]:
        for _ in range(batches_per_epoch):
            picks = rng.integers(0, len(volumes), BATCH_SIZE)
            patches = np.stack([random_crop(volumes[i], rng) for i in picks])
            yield torch.from_numpy(patches[:, None])

    return epoch


# --------------------------------------------------------------------------- measurement (child)


def process_tree_memory() -> tuple[int, int]:
    """Sum of PSS and of RSS over this process and all its descendants, in bytes."""
    me = psutil.Process()
    pss = rss = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # a worker that exited between listing and reading
        pss += info.pss
        rss += info.rss
    return pss, rss


class PeakMemory:
    """Background thread recording the peak PSS and RSS of the process tree, in bytes."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self.interval_s = interval_s
        self.peak_pss = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def sample(self) -> None:
        """Take one sample now."""
        pss, rss = process_tree_memory()
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_rss = max(self.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def endless(epochs: EpochFactory) -> Iterator[Any]:
    """Image batches of one epoch after another, forever."""
    while True:
        yield from epochs()


def check_batch(images: Any) -> None:
    """Raise if a batch is not ``(2, 1, 96, 96, 96)`` float32 with values in [0, 1]."""
    import torch

    expected = (BATCH_SIZE, 1, *(PATCH_EDGE,) * 3)
    if tuple(images.shape) != expected or images.dtype != torch.float32:
        raise AssertionError(
            f"batch is {tuple(images.shape)} {images.dtype}, expected {expected} float32"
        )
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise AssertionError(f"batch values span [{low}, {high}], expected [0, 1]")


def tree_cpu_s() -> float:
    """CPU time (user + system) of this process and all its descendants, reaped ones included, in s."""
    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for proc in me.children(recursive=True):
        try:
            child = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += child.user + child.system
    return total


def system_busy_s() -> float:
    """CPU time all processes on the machine have used since boot (all cores), in s."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def consume(epochs: EpochFactory, seconds: float) -> dict[str, float | int]:
    """Warm up, then count patches for ``seconds``.

    Returns counts, times (s) and the cores busy over the timed part: this
    loader's (process tree) and everything else on the machine (interference).
    """
    batches = endless(epochs)
    start = time.perf_counter()
    first_batch_s = None
    warm = 0
    for images in batches:
        check_batch(images)
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - start
        warm += 1
        if warm >= WARMUP_BATCHES and time.perf_counter() - start >= WARMUP_S:
            break
    patches = 0
    own_cpu0, all_cpu0 = tree_cpu_s(), system_busy_s()
    t0 = now = time.perf_counter()
    for images in batches:
        patches += images.shape[0]
        now = time.perf_counter()
        if now - t0 >= seconds:
            break
    wall = now - t0
    own_cpu, all_cpu = tree_cpu_s() - own_cpu0, system_busy_s() - all_cpu0
    return {
        "patches": patches,
        "seconds": round(wall, 3),
        "patches_per_s": round(patches / wall, 1),
        "cores_busy": round(own_cpu / wall, 2),
        "other_cores_busy": round(max(all_cpu - own_cpu, 0.0) / wall, 2),
        "warmup_batches": warm,
        "warmup_s": round(t0 - start, 3),
        "first_batch_s": round(first_batch_s, 3),
    }


def run_one(name: str, data: Dataset, workers: int, seconds: float) -> dict[str, Any]:
    """Build loader ``name``, measure it, and return its metrics (memory in MB)."""
    import torch

    torch.set_num_threads(workers)
    baseline_pss, baseline_rss = process_tree_memory()
    extra: Callable[[], dict[str, Any]] = dict
    with PeakMemory() as memory:
        build_start = time.perf_counter()
        if name == "spadkit":
            epochs, extra = spadkit_epochs(data, workers)
        elif name == "spadkit_nocache":
            epochs, extra = spadkit_epochs(data, workers, cache_bytes=0)
        elif name == "spadkit_smallcache":
            epochs, extra = spadkit_epochs(data, workers, cache_bytes=SMALL_CACHE_MB << 20)
        elif name == "spadkit_workers":
            epochs = spadkit_worker_epochs(data, workers)
        elif name == "torchio":
            epochs = torchio_epochs(data, workers)
        elif name == "monai":
            epochs = monai_epochs(data, workers)
        elif name == "numpy_ram":
            epochs = numpy_epochs(data)
        elif name in _large.LOADERS:
            epochs = _large.epochs(name, data.store.parent, workers, PATCH_EDGE, BATCH_SIZE, SAMPLES_PER_VOLUME, PERCENTILES, SEED)
        else:
            raise ValueError(f"unknown loader {name!r}; choose from {LOADERS}")
        build_s = time.perf_counter() - build_start
        built_pss, built_rss = process_tree_memory()
        metrics = consume(epochs, seconds)
    mb = 2**20
    return {
        **metrics,
        "peak_pss_mb": round(memory.peak_pss / mb, 1),
        "peak_rss_mb": round(memory.peak_rss / mb, 1),
        "baseline_pss_mb": round(baseline_pss / mb, 1),
        "baseline_rss_mb": round(baseline_rss / mb, 1),
        "built_pss_mb": round(built_pss / mb, 1),
        "built_rss_mb": round(built_rss / mb, 1),
        "spadkit_sources": spadkit_digest(),
        "build_s": round(build_s, 3),
        **extra(),
    }


# --------------------------------------------------------------------------- orchestration (parent)


def child_command(name: str, args: argparse.Namespace) -> list[str]:
    """Command line that measures loader ``name`` in a fresh interpreter."""
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--run-one",
        name,
        "--seconds",
        str(args.seconds),
        "--workers",
        str(args.workers),
        "--work",
        str(args.work),
    ]


def wait_until_quiet(max_wait_s: float) -> float:
    """Wait until the rest of the machine uses under ``QUIET_CORES`` cores (or ``max_wait_s``
    passed); returns the seconds waited. Other jobs on a 2-core machine skew every loader."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        before = system_busy_s()
        time.sleep(QUIET_PROBE_S)
        if (system_busy_s() - before) / QUIET_PROBE_S < QUIET_CORES:
            break
    return time.perf_counter() - start


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure ``name`` in a subprocess (own process group, killed after the time limit)."""
    limit_s = args.seconds + SETUP_ALLOWANCE_S
    child = subprocess.Popen(
        child_command(name, args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = child.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child and its DataLoader workers
        stdout, stderr = child.communicate()
        return {"error": f"timed out after {limit_s:.0f} s", "stderr_tail": stderr[-2000:]}
    results = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if child.returncode != 0 or not results:
        return {"error": f"exit status {child.returncode}", "stderr_tail": stderr[-2000:]}
    return json.loads(results[-1][len(RESULT_PREFIX) :])


def ratios(loaders: dict[str, dict[str, Any]]) -> dict[str, float | str | None]:
    """Throughput of spadkit relative to the fastest peer and to the in-RAM bound."""
    rate = {name: entry.get("patches_per_s") for name, entry in loaders.items()}
    peers = {name: rate[name] for name in PEERS if rate.get(name)}
    best_peer = max(peers, key=peers.get) if peers else None

    def ratio(num: str, den: str | None) -> float | None:
        if den is None or not rate.get(num) or not rate.get(den):
            return None
        return round(rate[num] / rate[den], 2)

    return {
        "best_peer": best_peer,
        "spadkit_vs_best_peer": ratio("spadkit", best_peer),
        "spadkit_vs_in_ram": ratio("spadkit", "numpy_ram"),
        "spadkit_workers_vs_best_peer": ratio("spadkit_workers", best_peer),
        "spadkit_smallcache_vs_best_peer": ratio("spadkit_smallcache", best_peer),
        "spadkit_nocache_vs_best_peer": ratio("spadkit_nocache", best_peer),
    }


def spadkit_digest() -> str:
    """Short SHA-1 of the spadkit package's Python sources (it is edited while benchmarks run)."""
    import hashlib

    import spadkit

    root = Path(spadkit.__file__).parent
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_commit() -> str | None:
    """``git describe --always --dirty`` of the repository holding this script, or None."""
    try:
        result = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def settings(args: argparse.Namespace, data: Dataset) -> dict[str, Any]:
    """Benchmark parameters, data, machine and library versions for the JSON file."""
    return {
        "patch": [PATCH_EDGE] * 3,
        "batch": BATCH_SIZE,
        "workers": args.workers,
        "torch_threads": args.workers,
        "samples_per_volume": SAMPLES_PER_VOLUME,
        "torchio_queue_max_length": QUEUE_LENGTH,
        "monai_batch": f"batch_size=1 item = {SAMPLES_PER_VOLUME} patches, split into batches of {BATCH_SIZE}",
        "intensity": f"clip to the case's {PERCENTILES[0]}-{PERCENTILES[1]} percentiles, scale to [0, 1]",
        "seconds": args.seconds,
        "repeats": args.repeats,
        "warmup": f">= {WARMUP_S} s and >= {WARMUP_BATCHES} batches, untimed",
        "memory_sample_interval_s": SAMPLE_INTERVAL_S,
        "cases": describe_cases(data),
        "spadkit_store": data.store.name,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git": git_commit(),
        "spadkit_sources": spadkit_digest(),
        "versions": {
            pkg: package_version(pkg)
            for pkg in ("torch", "torchio", "monai", "zarr", "spadkit", "numpy", "nibabel")
        },
    }


def bar_color(name: str) -> str:
    """Bar colour of a loader: spadkit blue (light without cache), peers grey, the bound green."""
    if name == "numpy_ram":
        return "tab:green"
    if name in ("spadkit_nocache", "spadkit_smallcache"):
        return "lightsteelblue"
    return "tab:blue" if name.startswith("spadkit") else "tab:gray"


def plot(loaders: dict[str, dict[str, Any]], names: dict[str, str], title: str, path: Path) -> None:
    """Two horizontal bar panels: patches/s and peak PSS (MB, RSS in the label)."""
    from matplotlib.figure import Figure

    measured = [name for name in loaders if "patches_per_s" in loaders[name]]
    ylabels = [names[name] for name in measured]
    y = np.arange(len(measured))
    colors = [bar_color(name) for name in measured]
    fig = Figure(figsize=(13, 0.7 * len(measured) + 2.2), layout="constrained")
    speed_ax, memory_ax = fig.subplots(1, 2, sharey=True)

    rates = [loaders[name]["patches_per_s"] for name in measured]
    bars = speed_ax.barh(y, rates, color=colors)
    speed_ax.bar_label(bars, fmt="%.0f", padding=3)
    speed_ax.set_xlabel(f"Patches per second ({PATCH_EDGE}³ float32, batch {BATCH_SIZE})")
    speed_ax.set_xlim(0, max(rates) * 1.18)

    pss = [loaders[name]["peak_pss_mb"] for name in measured]
    bars = memory_ax.barh(y, pss, color=colors)
    memory_ax.bar_label(
        bars,
        labels=[f"{p:.0f} (RSS {loaders[n]['peak_rss_mb']:.0f})" for p, n in zip(pss, measured)],
        padding=3,
    )
    baseline = float(np.median([loaders[name]["baseline_pss_mb"] for name in measured]))
    memory_ax.axvline(
        baseline, color="black", linestyle=":", linewidth=1, label="python + torch, no loader"
    )
    memory_ax.legend(loc="lower right", fontsize=9)
    memory_ax.set_xlabel("Peak PSS of process + workers, MB (RSS in brackets)")
    memory_ax.set_xlim(0, max(pss) * 1.45)

    speed_ax.set_yticks(y, ylabels)
    speed_ax.invert_yaxis()
    for ax in (speed_ax, memory_ax):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per loader")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loader.json"))
    parser.add_argument(
        "--workers", type=int, default=2, help="threads / worker processes of every loader"
    )
    parser.add_argument(
        "--work", type=Path, default=Path("benchmarks/_work"), help="folder for the built data"
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=300.0,
        help="seconds to wait, before each loader, for other processes to go quiet (0: do not wait)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds over all loaders; each loader reports its run with the least interference",
    )
    parser.add_argument("--only", nargs="+", choices=LOADERS + _large.LOADERS, help="run only these loaders")
    parser.add_argument(
        "--regime",
        choices=("small", "large"),
        default="small",
        help="small: MNI152 copies, data < cache; large: CT-size volumes several times the cache (benchmarks/_large.py)",
    )
    parser.add_argument("--large-cases", type=int, default=12, help="volumes of the large regime (12: ~1.9 GB decoded)")
    # internal: measure one loader in this process and print its result line
    parser.add_argument("--run-one", choices=LOADERS + _large.LOADERS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def describe_run(run: dict[str, Any]) -> str:
    """One line of console output for a finished (or failed) child run."""
    if "error" in run:
        return f"FAILED: {run['error']}\n{run['stderr_tail']}"
    return (
        f"{run['patches_per_s']:7.1f} patches/s  PSS {run['peak_pss_mb']:7.1f} MB  "
        f"RSS {run['peak_rss_mb']:7.1f} MB  (other jobs: {run['other_cores_busy']} cores)"
    )


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One loader's entry from its runs: the run with the least interference from other
    processes (else the first), with the peak memory over all successful runs (sampling
    every 0.1 s can only miss a peak, never invent one)."""
    good = [run for run in runs if "error" not in run]
    if not good:
        return runs[0]
    entry = dict(min(good, key=lambda run: run["other_cores_busy"]))
    for key in ("peak_pss_mb", "peak_rss_mb"):
        entry[key] = max(run[key] for run in good)
    sources = sorted({run["spadkit_sources"] for run in good})
    if len(sources) > 1:
        entry["warning"] = f"spadkit sources changed between runs: {sources}"
    return entry


def run_rounds(chosen: Sequence[str], names: dict[str, str], args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """``args.repeats`` interleaved rounds over the loaders ``chosen``, each in its own process."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    for round_index in range(args.repeats):
        for name in runs:
            waited = wait_until_quiet(args.max_wait) if args.max_wait > 0 else 0.0
            print(f"[{round_index + 1}/{args.repeats}] {names[name]:40s} ...", end=" ", flush=True)
            run = {"waited_for_quiet_s": round(waited, 1), **run_child(name, args)}
            runs[name].append(run)
            print(describe_run(run), flush=True)
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    """Build the data, measure every loader in its own process, write the JSON and PNG."""
    args = parse_args(argv)
    args.work = args.work.resolve()
    if args.run_one:
        result = run_one(args.run_one, dataset_paths(args.work), args.workers, args.seconds)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        os._exit(0)  # skip interpreter teardown: lingering loader workers must not hang the exit
    if args.regime == "large":
        main_large(args)
        return

    data = build_dataset(args.work)
    names = labels(args.workers)
    runs = run_rounds([name for name in LOADERS if name in (args.only or LOADERS)], names, args)
    loaders = {name: {"label": names[name], **summarise(found)} for name, found in runs.items()}
    if args.repeats > 1:
        for name, found in runs.items():
            loaders[name]["runs"] = found
    summary = ratios(loaders)
    best = summary["best_peer"]
    for entry in loaders.values():
        if best and entry.get("patches_per_s"):
            entry["ratio_to_best_peer"] = round(
                entry["patches_per_s"] / loaders[best]["patches_per_s"], 2
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"loaders": loaders, "settings": settings(args, data), "ratios": summary}
    seen = sorted(
        {run["spadkit_sources"] for found in runs.values() for run in found if "error" not in run}
    )
    report["settings"]["spadkit_sources_measured"] = seen
    if len(seen) > 1:
        print(f"WARNING: spadkit's sources changed during the run ({seen}): results mix versions")
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    title = (
        f"Random {PATCH_EDGE}³ patches from {len(data.nifti)} MNI152 volumes (1 mm and 1x1x3 mm), "
        f"{args.workers} workers, {os.cpu_count()} CPUs"
    )
    plot(loaders, names, title, args.out.with_suffix(".png"))
    print(json.dumps(summary))


def main_large(args: argparse.Namespace) -> None:
    """The large regime (benchmarks/_large.py): every loader in its own process, JSON with the
    ratios to the memory-mapped baseline."""
    files, _ = _large.build(args.work, args.large_cases)
    chosen = [name for name in _large.LOADERS if name in (args.only or _large.LOADERS)]
    runs = run_rounds(chosen, {name: name for name in chosen}, args)
    loaders = {name: {**summarise(found), "runs": found} for name, found in runs.items()}
    base = loaders.get("large_mmap", {}).get("patches_per_s")
    for entry in loaders.values():
        if base and entry.get("patches_per_s"):
            entry["ratio_to_mmap"] = round(entry["patches_per_s"] / base, 2)
    report = {
        "loaders": loaders,
        "settings": {
            "regime": "large",
            "cases": len(files),
            "shape_zyx": _large.SHAPE_ZYX,
            "spacing_zyx_mm": _large.SPACING_ZYX,
            "decoded_gb": round(len(files) * np.prod(_large.SHAPE_ZYX) * 2 / 1e9, 2),
            "patch": [PATCH_EDGE] * 3,
            "batch": BATCH_SIZE,
            "samples_per_volume": SAMPLES_PER_VOLUME,
            "workers": args.workers,
            "seconds": args.seconds,
            "repeats": args.repeats,
            "cpu_count": os.cpu_count(),
            "git": git_commit(),
            "spadkit_sources": spadkit_digest(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=int) + "\n")
    print(json.dumps({name: entry.get("patches_per_s") for name, entry in loaders.items()}))


if __name__ == "__main__":
    main()
