"""Bundled real data for the annotation tutorials (notebooks 05 and 06) and the annotator's tests.

The MNI152 2009a T1 template (nilearn, no download) at a coarser voxel size, in an
OME-Zarr store, and its gray matter (probability > 0.5) as the truth that a
simulated annotator copies. Gray matter is nearly an intensity band on this
template (PITFALLS 19), so a high Dice here shows that the loop works, not what
pretrained features add.
"""

from __future__ import annotations

import os

import numpy as np

from spadkit.demo import nilearn_file
from spadkit.ingest import intensity_stats
from spadkit.io import OMEZarrStore, read_volume
from spadkit.volume import Volume

#: The case id of the template in :func:`mni152_store`.
CASE = "mni152"


def _every(volume: Volume, step: int) -> Volume:
    """Every ``step``-th voxel along each axis (``step`` mm on the 1 mm template), the affine scaled to match."""
    if step == 1:
        return volume.load()
    affine = volume.affine.copy()
    affine[:3, :3] *= step
    return Volume(np.ascontiguousarray(volume.numpy()[:, ::step, ::step, ::step]), affine, modality=volume.modality)


def mni152_store(url: str | os.PathLike, *, step: int = 2) -> OMEZarrStore:
    """A writable store at ``url`` holding the MNI152 T1 as case :data:`CASE`, sampled every ``step`` mm.

    An existing store there is reopened as it is (a tutorial continues where it stopped).

    Args:
        url: folder of the store (created when missing).
        step: voxel size in mm: 2 gives (95, 117, 99) voxels, 1 the template's own (189, 233, 197).
    """
    store = OMEZarrStore(str(url), mode="a")
    if CASE not in store.cases():
        volume = _every(read_volume(nilearn_file("t1")), step)
        store.write_case(CASE, volume, attrs={"intensity": intensity_stats(volume)})
    return store


def mni152_gray_matter(*, step: int = 2) -> np.ndarray:
    """``(Z, Y, X)`` uint8: 1 where nilearn's gray-matter probability exceeds 0.5, on the grid of :func:`mni152_store`."""
    gm = _every(read_volume(nilearn_file("gm")), step).numpy()[0]
    return (gm / gm.max() > 0.5).astype(np.uint8)  # the map is stored 0..1 or 0..255 depending on the nilearn version
