"""The ``large`` regime of benchmarks/loader.py: CT-size volumes, data several times the chunk cache.

``N`` synthetic CT volumes of 300 x 512 x 512 int16 voxels (2.5 x 0.7 x 0.7 mm; smooth
structure plus noise, an air border of -3024 as scanners pad their field of view),
about 150 MB each decoded, so 12 of them (~1.9 GB) are almost 4x the default 512 MiB
cache: most patches decode their chunks, the regime of an independent measurement
(78 patches/s with default settings against 162 for nibabel memory-mapped crops).
Every loader delivers batches of 2 random 96^3 patches scaled to [0, 1] by the
case's percentiles:

* ``large_spadkit``: ``PatchStream`` with its defaults (512 MiB cache, 2 threads);
* ``large_spadkit_nocache``: the same with the cache off;
* ``large_spadkit_label``: the same with ``LabelSampler(0.33)`` on a label of a few
  spheres (its first visits scan each label volume for foreground);
* ``large_mmap``: the baseline: uncompressed NIfTI files memory-mapped by nibabel,
  crops cut, cast and scaled by 2 threads.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

SHAPE_ZYX = (300, 512, 512)
"""Voxels of each volume (Z, Y, X)."""
SPACING_ZYX = (2.5, 0.7, 0.7)
"""Voxel size in mm (Z, Y, X)."""
LOADERS = ("large_spadkit", "large_spadkit_nocache", "large_spadkit_label", "large_mmap")


def volume(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Case ``index``: image ``(Z, Y, X)`` int16 and a label of 3 spheres (uint8)."""
    from scipy import ndimage

    rng = np.random.default_rng(index)
    coarse = rng.normal(0, 300, tuple(-(-n // 8) + 1 for n in SHAPE_ZYX))
    image = ndimage.zoom(coarse, 8, order=1)[tuple(slice(0, n) for n in SHAPE_ZYX)]
    image = (image + rng.normal(0, 20, SHAPE_ZYX)).astype(np.int16)
    image[:, :, :40] = -3024
    label = np.zeros(SHAPE_ZYX, np.uint8)
    z, y, x = np.ogrid[tuple(slice(0, n) for n in SHAPE_ZYX)]
    for k in range(3):
        c = [int(rng.integers(20, n - 20)) for n in SHAPE_ZYX]
        label[((z - c[0]) * SPACING_ZYX[0]) ** 2 + ((y - c[1]) * SPACING_ZYX[1]) ** 2 + ((x - c[2]) * SPACING_ZYX[2]) ** 2 < 15**2] = k + 1
    return image, label


def build(work: Path, cases: int) -> tuple[list[Path], Path]:
    """Write ``cases`` volumes as uncompressed NIfTI and into a spadkit store (with labels); returns both."""
    import nibabel as nib

    from spadkit.ingest import intensity_stats
    from spadkit.io import OMEZarrStore
    from spadkit.volume import LabelVolume, Volume

    root = work / "large"
    shutil.rmtree(root, ignore_errors=True)
    (root / "nifti").mkdir(parents=True)
    store = OMEZarrStore(str(root / "spadkit.zarr"), mode="a")
    files = []
    for i in range(cases):
        image, label = volume(i)
        image_volume = Volume.from_spacing(image[None], SPACING_ZYX, modality="CT")
        label_volume = LabelVolume(label[None], image_volume.affine, classes={0: "background", 1: "a", 2: "b", 3: "c"})
        store.write_case(f"ct{i:02d}", image_volume, label_volume, attrs={"intensity": intensity_stats(image_volume)})
        files.append(root / "nifti" / f"ct{i:02d}.nii")
        nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), np.diag([*SPACING_ZYX[::-1], 1.0])), files[-1])
    return files, root / "spadkit.zarr"


def paths(work: Path) -> tuple[list[Path], Path]:
    root = work / "large"
    return sorted((root / "nifti").glob("*.nii")), root / "spadkit.zarr"


def epochs(name: str, work: Path, workers: int, patch: int, batch: int, samples: int, percentiles: tuple[float, float], seed: int) -> Any:
    """The epoch factory of loader ``name`` (see the module docstring)."""
    files, store = paths(work)
    if name == "large_mmap":
        return mmap_epochs(files, workers, patch, batch, samples, percentiles, seed)
    from spadkit.data import DatasetSource, LabelSampler, PatchSize, PatchStream

    options: dict[str, Any] = {"cache_bytes": 0} if name == "large_spadkit_nocache" else {}
    source: Any = str(store)
    if name == "large_spadkit_label":
        options["sampler"] = LabelSampler(0.33)
        source = DatasetSource(str(store), label="seg")
    stream = PatchStream(
        [source], patch_size=PatchSize(voxels=patch, spacing_aware=False), batch_size=batch, samples_per_case=samples, num_threads=workers, seed=seed, **options
    )
    return lambda: (b["image"] for b in stream)


def mmap_epochs(files: list[Path], workers: int, patch: int, batch: int, samples: int, percentiles: tuple[float, float], seed: int) -> Any:
    """Memory-mapped uncompressed NIfTI crops (nibabel), cut and scaled by ``workers`` threads."""
    import nibabel as nib
    import torch

    volumes = [np.asarray(nib.load(path, mmap=True).dataobj) for path in files]  # (X, Y, Z) memmaps
    # percentiles from a strided subsample, as a loader would cache them per case
    bounds = [np.percentile(v[::4, ::4, ::4], percentiles) for v in volumes]

    def crop(key: tuple[int, int]) -> np.ndarray:
        case, k = key
        rng = np.random.default_rng([seed, case, k])
        v = volumes[case]
        start = [int(rng.integers(0, n - patch + 1)) for n in v.shape]
        lo, hi = (np.float32(b) for b in bounds[case])
        window = np.asarray(v[tuple(slice(s, s + patch) for s in start)], dtype=np.float32)
        return np.clip((window - lo) / (hi - lo), 0, 1)[None]

    def epoch() -> Any:
        order = np.random.default_rng(seed).permutation(len(volumes))
        keys = [(int(c), k) for c in order for k in range(samples)]
        with ThreadPoolExecutor(workers) as pool:
            patches = pool.map(crop, keys)
            while True:
                chunk = [p for _, p in zip(range(batch), patches)]
                if len(chunk) < batch:
                    return
                yield torch.from_numpy(np.stack(chunk))

    return epoch
