"""Synthetic brain images, SynthSeg-style, from the tissue maps bundled with nilearn.

The only real 3D data that ships with the installed packages is one MNI152 template.
For pretraining variety without downloads this module draws images *from its tissue
probability maps* (gray matter, white matter, CSF = the brain's filled outline minus
both, and the non-brain head from the T1's head outline), each case with

* a random contrast: a random mean intensity per tissue (any order: T1-, T2-, PD-like
  and implausible ones) and a random within-tissue texture amplitude;
* a random smooth deformation (a few mm) and a random rotation/scaling;
* a random spacing: 1 mm isotropic, thin in-plane with thick slices (1x1x3, 0.7x0.7x5 mm,
  slice profile averaged, not sub-sampled), coarse isotropic, or a single 2D slice
  (axial, coronal or sagittal);
* a random multiplicative bias field, smooth within-tissue texture and mild Rician-like
  noise (white noise is kept small: per-patch normalised MAE targets of noise-dominated
  patches are unpredictable, and a tokenizer cannot code it).

The result is one anatomy seen through many scanners: contrast and geometry vary, the
anatomy does not (beyond the deformation). A probe on the real T1 is therefore held out
in contrast and spacing, but not in anatomy. ``write_synthetic_store`` writes the cases
through :func:`spadkit.ingest.ingest`; ``python -m spadkit.data.synth N OUT.zarr``
does the same from the shell.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

#: (name, depth/in-plane spacing in mm (Z, Y, X), probability); "2d" draws one slice
SPACINGS: tuple[tuple[str, tuple[float, float, float], float], ...] = (
    ("iso1", (1.0, 1.0, 1.0), 0.25),
    ("thick3", (3.0, 1.0, 1.0), 0.2),
    ("thick5", (5.0, 0.7, 0.7), 0.15),
    ("iso1.5", (1.5, 1.5, 1.5), 0.1),
    ("2d", (1.0, 0.8, 0.8), 0.3),
)
TISSUES = ("background", "head", "csf", "gray matter", "white matter")


@lru_cache(maxsize=1)
def tissue_maps() -> tuple[np.ndarray, np.ndarray]:
    """``(maps, affine)``: ``(5, Z, Y, X)`` float32 probabilities of :data:`TISSUES` at 1 mm (RAS, Z first)."""
    from spadkit.demo import nilearn_file
    from spadkit.io import read_volume

    gm_volume = read_volume(nilearn_file("gm"))
    gm, wm, t1 = (read_volume(nilearn_file(k)).numpy()[0].astype(np.float32) for k in ("gm", "wm", "t1"))
    scale = max(gm.max(), wm.max())
    gm, wm = gm / scale, wm / scale
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(gm + wm > 0.2, iterations=3))
    brain = ndimage.gaussian_filter(brain.astype(np.float32), 1.0)
    csf = np.clip(brain - gm - wm, 0, 1)
    head = ndimage.binary_fill_holes(t1 > 0.1 * np.percentile(t1, 99))
    head = np.clip(ndimage.gaussian_filter(head.astype(np.float32), 1.0) - brain, 0, 1)
    background = np.clip(1 - head - csf - gm - wm, 0, 1)
    maps = np.stack([background, head, csf, gm, wm])
    return maps / maps.sum(0, keepdims=True).clip(1e-6), gm_volume.affine


@dataclass(frozen=True)
class SynthCase:
    """One synthetic image: ``array`` ``(Z, Y, X)`` float32 in about [0, 1], its spacing and kind."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    kind: str


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], control: int, amplitude: float) -> np.ndarray:
    """A smooth random field of ``shape``: a ``control``^3 Gaussian grid, upsampled (cubic to 16^3, then linear)."""
    grid = ndimage.zoom(rng.normal(0, amplitude, (control,) * 3), 16 / control, order=3, mode="nearest")
    return ndimage.zoom(grid, [n / 16 for n in shape], order=1, mode="nearest", grid_mode=True)[tuple(slice(0, n) for n in shape)]


def synth_case(rng: np.random.Generator) -> SynthCase:
    """Draw one synthetic image (see the module docstring)."""
    maps, _ = tissue_maps()
    names, spacings, probs = zip(*SPACINGS)
    choice = rng.choice(len(SPACINGS), p=np.asarray(probs) / sum(probs))
    kind, spacing = names[choice], spacings[choice]
    source = np.array(maps.shape[1:], dtype=float)
    # output grid: the brain-bearing box at the target spacing, cropped at random (70-100 % per axis)
    extent = source * rng.uniform(0.7, 1.0, 3)
    start = rng.uniform(0, source - extent)
    shape = np.maximum(1, np.round(extent / np.asarray(spacing))).astype(int)
    if kind == "2d":
        axis = rng.integers(3)  # axial, coronal or sagittal: the slice axis goes first
        spacing = (1.0, *spacing[1:])
        order = [axis] + [a for a in range(3) if a != axis]
        shape = np.array([1, *np.round(extent[order[1:]] / spacing[1]).astype(int)])
        start[axis] = rng.uniform(0.3, 0.7) * source[axis]
    else:
        order = [0, 1, 2]
    # source voxel coordinates of every output voxel: scale, a small rotation about the centre, a deformation
    axes = [start[order[i]] + (np.arange(shape[i]) + 0.5) * (spacing[i] if kind != "2d" or i else 1.0) for i in range(3)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))  # in the output axis order
    centre = coords.reshape(3, -1).mean(1)[:, None, None, None]
    angle = np.deg2rad(rng.uniform(-10, 10))
    rotation = np.eye(3)
    rotation[1:, 1:] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    coords = np.einsum("ij,j...->i...", rotation * rng.uniform(0.9, 1.1), coords - centre) + centre
    coords += np.stack([_smooth_field(rng, shape, 4, 2.0) for _ in range(3)])
    source_coords = np.empty_like(coords)
    source_coords[order] = coords
    thickness = spacing[0] if kind != "2d" else 1.0
    contrast = rng.uniform(0, 1, len(TISSUES))
    contrast[0] = rng.uniform(0, 0.1)  # air stays dark: PUMIT's foreground is "above the minimum"
    texture = rng.uniform(0.0, 0.08, len(TISSUES))
    mean_map = np.full(shape, contrast[0], dtype=np.float32)
    texture_map = np.full(shape, texture[0], dtype=np.float32)
    for tissue in range(1, len(TISSUES)):  # background: what the other tissues leave
        prob = maps[tissue]
        if thickness > 1:  # slice profile: average over the slice thickness along Z (before axes are permuted)
            prob = ndimage.uniform_filter1d(prob, size=round(thickness), axis=order[0])
        sampled = ndimage.map_coordinates(prob, source_coords, order=1, mode="constant", cval=0.0)
        mean_map += sampled * (contrast[tissue] - contrast[0])
        texture_map += sampled * (texture[tissue] - texture[0])
    grain = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.5)  # tissue texture: smooth, not white
    image = mean_map + texture_map * grain / max(float(grain.std()), 1e-6)
    bias = np.exp(_smooth_field(rng, shape, 3, rng.uniform(0, 0.25)))
    image = image * bias.astype(np.float32)
    noise = rng.uniform(0.002, 0.02)
    image = np.hypot(image + noise * rng.standard_normal(shape), noise * rng.standard_normal(shape)).astype(np.float32)
    return SynthCase(image, tuple(float(s) for s in spacing), kind)


def write_synthetic_store(count: int, store_url: str | os.PathLike, seed: int = 0, workdir: str | os.PathLike | None = None):
    """Draw ``count`` cases and ingest them into a new store at ``store_url`` (modality MR, int16).

    Returns the :class:`~spadkit.ingest.IngestReport`. Images are written as NIfTI with
    their spacing in the affine into a temporary folder (or ``workdir``) first.
    """
    import nibabel as nib

    from spadkit.ingest import ingest

    rng = np.random.default_rng(seed)
    folder = Path(workdir or tempfile.mkdtemp(prefix="spadkit_synth_"))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    try:
        for i in range(count):
            case = synth_case(rng)
            data = np.round(np.clip(case.array, 0, None) * 1000).astype(np.int16)
            affine = np.diag([*case.spacing[::-1], 1.0])  # NIfTI axes (X, Y, Z) from the (Z, Y, X) array
            name = f"synth{i:03d}_{case.kind}"
            nib.save(nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine), folder / "images" / f"{name}.nii.gz")
            (folder / "images" / f"{name}.json").write_text(json.dumps({"Modality": "MR", "spadkit_synthetic": True}) + "\n")
        return ingest(folder, str(store_url), layout="flat")
    finally:
        if workdir is None:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m spadkit.data.synth", description="Write N synthetic brain images into an OME-Zarr store.")
    parser.add_argument("count", type=int, help="number of cases")
    parser.add_argument("store", help="output store, e.g. synth.zarr")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = write_synthetic_store(args.count, args.store, seed=args.seed)
    print(report)


if __name__ == "__main__":
    main()
