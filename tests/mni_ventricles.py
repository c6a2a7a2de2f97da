"""The lateral ventricles of nilearn's MNI152 T1 as a target for boxes, masks and image classes (no downloads).

The ventricles are the two large dark (CSF) components near the brain's centre: voxels darker than
0.25 (T1 scaled to [0, 1]) inside a central block, its two largest connected components (left and
right, about 680 voxels each at 1 mm). They need context to find (sulcal CSF and the background are
just as dark, PITFALLS 19), and their bounding boxes are a real detection target.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from spadkit.ingest import intensity_stats
from spadkit.io import OMEZarrStore
from spadkit.volume import LabelVolume, Volume
from tests.mni_gm import mni_t1_gm

#: Central block (Z, Y, X slices of the RAS template) searched for the ventricles.
CENTRE = (slice(75, 105), slice(105, 165), slice(78, 120))
#: A crop (origin, shape) holding both ventricles with a margin.
CROP_ORIGIN, CROP_SHAPE = (64, 96, 64), (48, 80, 72)


@functools.lru_cache(maxsize=1)
def ventricles() -> tuple[np.ndarray, np.ndarray]:
    """``(t1, label)``: the ``(Z, Y, X)`` float32 T1 in [0, 1] and int64 labels 1 (first ventricle along X), 2 (second), 0 elsewhere."""
    t1, _ = mni_t1_gm()
    dark = t1[CENTRE] < 0.25
    components, count = ndimage.label(dark)
    sizes = ndimage.sum(dark, components, range(1, count + 1))
    first, second = (int(i) + 1 for i in np.argsort(sizes)[-2:])
    by_x = sorted((first, second), key=lambda c: np.nonzero(components == c)[2].mean())
    label = np.zeros(t1.shape, np.int64)
    label[CENTRE] = np.select([components == by_x[0], components == by_x[1]], [1, 2], 0)
    return t1, label


def crop(origin=CROP_ORIGIN, shape=CROP_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A crop of :func:`ventricles`: image ``(1, Z, Y, X)`` float32 and labels ``(Z, Y, X)`` int64."""
    t1, label = ventricles()
    box = tuple(slice(o, o + n) for o, n in zip(origin, shape))
    return t1[box][None].copy(), label[box].copy()


def bounding_boxes(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(corners (N, 6), classes (N,))``: the half-open voxel box of each foreground class of ``label``."""
    classes = [int(c) for c in np.unique(label) if c > 0]
    corners = [np.concatenate([[a.min() for a in np.nonzero(label == c)], [a.max() + 1 for a in np.nonzero(label == c)]]) for c in classes]
    return np.asarray(corners, np.float64).reshape(-1, 6), np.asarray(classes, np.int64)


def write_crop(store: OMEZarrStore, case_id: str, origin=CROP_ORIGIN, shape=CROP_SHAPE, *, spacing=(1.0, 1.0, 1.0), with_label: bool = False) -> np.ndarray:
    """Write a crop as a case (with its ventricle label map when ``with_label``); return its labels ``(Z, Y, X)``."""
    image, label = crop(origin, shape)
    volume = Volume.from_spacing(image, spacing, (0.0, 0.0, 0.0), modality="MR")
    label_volume = LabelVolume(label[None].astype(np.int32), volume.affine, classes={0: "background", 1: "ventricle_a", 2: "ventricle_b"}) if with_label else None
    store.write_case(case_id, volume, label_volume, attrs={"intensity": intensity_stats(volume, label_volume)})
    return label
