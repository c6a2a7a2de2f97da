"""Saving a one-slice correction as a new label version: copy-on-write vs a full copy.

``python benchmarks/label_save.py --out benchmarks/results/label_save.json``

On a synthetic (Z, Y, X) = 300 x 512 x 512 label (a few ellipsoid "organs", uint8, stored
int32 with a 5-level pyramid) in a fresh local store, each save corrects one axial
slice (a disc of a new class), marks it annotated and passes the ``changed`` hint, as
``AnnotationSession.submit_correction`` does. Modes, ``--saves`` saves each, one store
per mode:

* ``copy_on_write``: the store's behaviour (only changed chunk files written, the rest
  hard-linked to the previous version);
* ``full_copy``: every version written in full (the behaviour before copy-on-write,
  reachable only through the private ``OMEZarrStore._copy_on_write`` flag).

``extra`` holds two copy-on-write variants that show where the time goes: without the
``changed`` hint (every chunk compared), and without the fsync of the written files.
Writes the JSON (``runs``: mode, seconds, bytes_written per save) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from spadkit.io import OMEZarrStore
from spadkit.io.zarrstore import CheckedStore
from spadkit.volume import LabelVolume, Volume

try:
    from benchmarks._machine import cpu_model, package_version
except ImportError:  # run as a script: benchmarks/ is on the path
    from _machine import cpu_model, package_version  # type: ignore[no-redef]


def synthetic_label(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """``(Z, Y, X)`` uint8 label of a few random ellipsoids (classes 1-3) on background."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    label = np.zeros(shape, np.uint8)
    for value in (1, 2, 3, 1, 2):
        centre = rng.uniform(0.2, 0.8, 3) * shape
        radii = rng.uniform(0.08, 0.25, 3) * shape
        inside = ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + ((xx - centre[2]) / radii[2]) ** 2 <= 1
        label[inside] = value
    return label


@contextmanager
def mode_flags(*, copy_on_write: bool, fsync: bool) -> Iterator[None]:
    """Switch the store's private copy-on-write flag and the fsync of written files for the block."""
    real = CheckedStore.make_durable
    OMEZarrStore._copy_on_write = copy_on_write
    if not fsync:
        CheckedStore.make_durable = lambda self, journal, upto: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        OMEZarrStore._copy_on_write = True
        CheckedStore.make_durable = real  # type: ignore[method-assign]


def one_slice_saves(root: Path, label: np.ndarray, saves: int, *, hint: bool, seed: int) -> list[dict]:
    """Ingest ``label`` as version 1, then time ``saves`` one-slice corrections (a random z each)."""
    store = OMEZarrStore(str(root), mode="a")
    image = Volume(np.zeros((1, *label.shape), np.int16), modality="CT")
    store.write_case("big", image, LabelVolume(label, image.affine))
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[: label.shape[1], : label.shape[2]]
    current, annotated, rows = label.copy(), np.zeros(label.shape, bool), []
    for _ in range(saves):
        z = int(rng.integers(0, label.shape[0]))
        cy, cx, r = rng.uniform(100, label.shape[1] - 100), rng.uniform(100, label.shape[2] - 100), rng.uniform(30, 90)
        current[z][(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = int(rng.integers(1, 4))
        annotated[z] = True
        changed = (slice(z, z + 1), slice(None), slice(None)) if hint else None
        start = time.perf_counter()
        store.save_label("big", LabelVolume(current, image.affine), annotated=annotated, changed=changed, message=f"slice z={z}")
        seconds = time.perf_counter() - start
        entry = store.label_versions("big")[-1]
        rows.append({"seconds": seconds, "bytes_written": entry["bytes_written"], "chunks_written": entry["chunks_written"], "chunks_shared": entry["chunks_shared"], "z": z})
    np.testing.assert_array_equal(store.read_label("big").numpy()[0], current)  # the last version is what was submitted
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["copy_on_write", "full_copy"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, unit, scale in ((axes[0], "seconds", "s", 1.0), (axes[1], "bytes_written", "MB", 1e-6)):
        values = [[r[key] * scale for r in result["runs"] if r["mode"] == mode] for mode in modes]
        ax.boxplot(values, tick_labels=[m.replace("_", " ") for m in modes])
        for i, vals in enumerate(values, start=1):
            ax.scatter(np.full(len(vals), i), vals, s=10, alpha=0.6)
            ax.annotate(f"median {statistics.median(vals):.3g} {unit}", (i, statistics.median(vals)), textcoords="offset points", xytext=(8, 4), fontsize=8)
        ax.set_ylabel(f"{key.replace('_', ' ')} per save ({unit})")
    shape = "x".join(map(str, result["settings"]["shape_zyx"]))
    fig.suptitle(f"One-slice correction saved as a label version ({shape} label, {result['settings']['saves']} saves each)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/label_save.json"))
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--saves", type=int, default=10)
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the stores (default: the system's temp folder)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    label = synthetic_label(tuple(args.shape))
    variants = {
        "copy_on_write": {"copy_on_write": True, "fsync": True, "hint": True},
        "full_copy": {"copy_on_write": False, "fsync": True, "hint": True},
        "copy_on_write_without_hint": {"copy_on_write": True, "fsync": True, "hint": False},
        "copy_on_write_without_fsync": {"copy_on_write": True, "fsync": False, "hint": True},
    }
    measured = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for name, flags in variants.items():
            with mode_flags(copy_on_write=flags["copy_on_write"], fsync=flags["fsync"]):
                measured[name] = one_slice_saves(Path(tmp) / f"{name}.zarr", label, args.saves, hint=flags["hint"], seed=1)
            print(f"{name}: median {statistics.median(r['seconds'] for r in measured[name]):.3f} s, {statistics.median(r['bytes_written'] for r in measured[name]) / 1e6:.2f} MB per save")
    result = {
        "runs": [{"mode": mode, **row} for mode in ("copy_on_write", "full_copy") for row in measured[mode]],
        "extra": {name: measured[name] for name in ("copy_on_write_without_hint", "copy_on_write_without_fsync")},
        "summary": {name: {"median_seconds": statistics.median(r["seconds"] for r in rows), "median_bytes_written": statistics.median(r["bytes_written"] for r in rows)} for name, rows in measured.items()},
        "settings": {
            "shape_zyx": list(args.shape),
            "label_dtype_stored": "int32",
            "spacing_mm": [1.0, 1.0, 1.0],
            "saves": args.saves,
            "correction": "a disc (radius 30-90 voxels) of a new class in one random axial slice; the slice is marked annotated",
            "hint": "changed=(slice(z, z + 1), :, :) except in copy_on_write_without_hint",
            "store": "local file system, unsharded, blosc-lz4, 64^3 chunks",
            "cpu": cpu_model(),
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
            "zarr": package_version("zarr"),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
