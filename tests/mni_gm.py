"""Real segmentation data for fine-tuning and inference tests: nilearn's MNI152 T1 with its gray-matter
map thresholded at 0.5 (the label-efficiency benchmark's intensity-band target), no downloads."""

from __future__ import annotations

import functools

import numpy as np

from spadkit.demo import nilearn_file
from spadkit.io import read_volume

#: brain-centred crop origin (Z, Y, X) of the (189, 233, 197) RAS template
ORIGIN = (60, 80, 60)


@functools.lru_cache(maxsize=1)
def mni_t1_gm() -> tuple[np.ndarray, np.ndarray]:
    """``(Z, Y, X)`` float32 T1 scaled to [0, 1] and the bool gray-matter mask (probability > 0.5), 1 mm."""
    t1 = read_volume(nilearn_file("t1")).numpy()[0].astype(np.float32)
    gm = read_volume(nilearn_file("gm")).numpy()[0].astype(np.float32)
    t1 = (t1 - t1.min()) / (t1.max() - t1.min())
    return t1, gm / gm.max() > 0.5  # the map is stored 0..1 or 0..255 depending on the nilearn version


def mni_crop(shape: tuple[int, int, int], origin: tuple[int, int, int] = ORIGIN) -> tuple[np.ndarray, np.ndarray]:
    """A ``shape`` crop of :func:`mni_t1_gm` starting at ``origin``: image ``(1, Z, Y, X)``, labels ``(Z, Y, X)`` int64."""
    t1, gm = mni_t1_gm()
    box = tuple(slice(o, o + n) for o, n in zip(origin, shape))
    return t1[box][None].copy(), gm[box].astype(np.int64)


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Foreground Dice of two bool/0-1 arrays."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    return float(2 * (pred & target).sum() / max(pred.sum() + target.sum(), 1))
