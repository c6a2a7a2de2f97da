"""Peak memory of ``spadkit ingest`` per case, measured in a fresh process.

A synthetic CT-like volume (default 300 x 512 x 512 int16, 150 MiB of voxels:
a body-shaped ellipse of soft tissue and bone inside air, padded with -3024
outside a circular field of view) is written as uncompressed NIfTI, once per
case. Each measurement runs ``spadkit.ingest.ingest`` in a child process and
reads that child's peak resident set size: after the imports the child resets
its high-water mark (``/proc/self/clear_refs``, Linux) and records its RSS, so
the number reported is what ingest itself adds at its peak (``VmHWM - VmRSS``).

Usage::

    python benchmarks/ingest_memory.py --cases 1 --workers 1
    python benchmarks/ingest_memory.py --cases 2 --workers 2 --json out.json
    python benchmarks/ingest_memory.py --label      # also a uint8 label map per case (body > soft tissue)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np


def ct_like(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A (Z, Y, X) int16 CT-like volume: air, an elliptic body with bone, -3024 outside the FOV."""
    _, y, x = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:y, :x]
    cy, cx = (y - 1) / 2, (x - 1) / 2
    body = ((yy - cy) / (0.35 * y)) ** 2 + ((xx - cx) / (0.45 * x)) ** 2 <= 1
    bone = ((yy - cy) / (0.06 * y)) ** 2 + ((xx - cx) / (0.06 * x)) ** 2 <= 1
    fov = (yy - cy) ** 2 + (xx - cx) ** 2 <= (0.5 * min(x, y)) ** 2
    plane = np.full((y, x), -1000, dtype=np.int16)
    plane[body] = 40
    plane[bone] = 700
    volume = np.broadcast_to(plane, shape).copy()
    volume += rng.integers(-20, 21, size=shape, dtype=np.int16)
    volume[:, ~fov] = -3024  # the scanner's padding outside the field of view, exact
    return volume


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _child(dataset: str, store: str, workers: int, queue: mp.Queue) -> None:
    import spadkit.ingest as ingest_module  # imports first: the baseline excludes them

    with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    report = ingest_module.ingest(dataset, store, num_workers=workers, progress=False)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    queue.put({"ok": report.ok, "summary": report.summary(), "baseline_kib": base, "peak_kib": peak, "seconds": seconds})


def measure(shape: tuple[int, int, int], cases: int, workers: int, label: bool = False) -> dict:
    """Ingest ``cases`` synthetic volumes (with label maps if ``label``) with ``workers`` threads; return peak memory numbers."""
    import nibabel as nib

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ds"
        (folder / "images").mkdir(parents=True)
        (folder / "labels").mkdir()
        affine = np.diag([0.7, 0.7, 1.5, 1.0])
        for i in range(cases):
            data = ct_like(shape, seed=i).transpose(2, 1, 0)  # nibabel order (x, y, z)
            nib.save(nib.Nifti1Image(data, affine), folder / "images" / f"ct{i}.nii")
            if label:
                nib.save(nib.Nifti1Image((data > 0).astype(np.uint8), affine), folder / "labels" / f"ct{i}.nii")
        queue: mp.Queue = mp.get_context("spawn").Queue()
        process = mp.get_context("spawn").Process(target=_child, args=(str(folder), str(Path(tmp) / "s.zarr"), workers, queue))
        process.start()
        result = queue.get()
        process.join()
    voxel_bytes = int(np.prod(shape)) * 2
    added = (result["peak_kib"] - result["baseline_kib"]) * 1024
    return {
        **result,
        "shape_zyx": list(shape),
        "cases": cases,
        "workers": workers,
        "label": label,
        "voxel_mib_per_case": voxel_bytes / 2**20,
        "added_peak_mib": added / 2**20,
        "added_peak_over_one_case_voxel_bytes": added / voxel_bytes,
        "added_peak_over_voxel_bytes_per_worker": added / voxel_bytes / min(cases, workers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--cases", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--label", action="store_true", help="add a uint8 label map to every case")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    result = measure(tuple(args.shape), args.cases, args.workers, args.label)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
