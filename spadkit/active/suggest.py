"""Which slice to correct next: uncertainty of the light head combined with diversity from corrected slices.

Every slice of the three axes is a candidate. Its score is

    score = uncertainty * (DIVERSITY_FLOOR + (1 - DIVERSITY_FLOOR) * diversity)

* ``uncertainty``: mean predictive entropy of the light head over the slice, divided
  by ``log K`` (0 = certain, 1 = uniform), evaluated on a grid of every
  ``stride``-th voxel (the full prediction is not needed to rank slices);
* ``diversity``: the distance of the slice's mean backbone token feature to the
  nearest corrected slice or box (for one on the same axis also scaled down
  within two tokens of it), divided by the largest such distance (0..1).

Before any head is fitted (cold start) every voxel is equally uncertain and the
score is the share of the slice inside the body (intensity above Otsu's
threshold), so the first suggestion is a slice with the most tissue, and then
the diversity term spreads the next ones out. Corrected slices are never suggested.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from skimage.filters import threshold_otsu

from spadkit.active.history import AXIS_NAMES, item_box, item_key
from spadkit.models.light_head import LightHead, VoxelFeatures

DIVERSITY_FLOOR = 0.3
STRIDE = 4


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """A slice to correct: ``axis`` (0 = Z, 1 = Y, 2 = X), ``index``, its ``score`` and why."""

    axis: int
    index: int
    score: float
    reason: str


def strided_grid(shape: Sequence[int], stride: int) -> tuple[list[np.ndarray], torch.Tensor]:
    """Per-axis sample positions and their ``(N, 3)`` voxel indices (z, y, x)."""
    axes = [np.arange(stride // 2, n, stride) if n > stride else np.array([n // 2]) for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return axes, torch.from_numpy(grid)


@torch.no_grad()
def uncertainty_grid(features: VoxelFeatures, head: LightHead | None, stride: int = STRIDE) -> tuple[list[np.ndarray], np.ndarray]:
    """Normalised entropy (0..1) on the strided grid ``(gz, gy, gx)``; ones without a head."""
    axes, index = strided_grid(features.shape, stride)
    shape = tuple(len(a) for a in axes)
    if head is None:
        return axes, np.ones(shape, np.float32)
    probs = head(features.gather(index)).softmax(1)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(1) / math.log(max(probs.shape[1], 2))
    return axes, entropy.reshape(shape).numpy()


def tissue_grid(features: VoxelFeatures, stride: int = STRIDE) -> np.ndarray:
    """Body voxels (first intensity feature above Otsu's threshold) on the strided grid."""
    axes, _ = strided_grid(features.shape, stride)
    intensity = features.intensity[0][np.ix_(*axes)].float().numpy()
    return intensity > threshold_otsu(intensity) if np.ptp(intensity) > 0 else np.ones_like(intensity, bool)


def _token_descriptors(features: VoxelFeatures) -> list[np.ndarray]:
    """Per axis, ``(n_slices, F_t)`` mean token features of each slice, standardised over all slices."""
    tokens = features.tokens.float().numpy()
    per_axis = []
    for axis, n in enumerate(features.shape):
        planes = np.minimum(np.arange(n) // features.patch[axis], tokens.shape[1 + axis] - 1)
        means = tokens.mean(axis=tuple(1 + a for a in range(3) if a != axis)).T  # (g_axis, F)
        per_axis.append(means[planes])
    stacked = np.concatenate(per_axis)
    mean, std = stacked.mean(0), stacked.std(0) + 1e-6
    return [(d - mean) / std for d in per_axis]


def _item_descriptor(item: Mapping[str, Any], features: VoxelFeatures, descriptors: list[np.ndarray]) -> np.ndarray:
    if "box" not in item:
        return descriptors[int(item["axis"])][int(item["index"])]
    box = item_box(item, features.shape)
    return np.mean([descriptors[a][box[a]].mean(0) for a in range(3)], axis=0)


def diversity(features: VoxelFeatures, items: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
    """Per axis, ``(n_slices,)`` distance to the nearest corrected item, scaled to 0..1 (ones without items)."""
    descriptors = _token_descriptors(features)
    if not items:
        return [np.ones(len(d), np.float32) for d in descriptors]
    out = []
    for axis, desc in enumerate(descriptors):
        nearest = np.full(len(desc), np.inf)
        for item in items:
            dist = np.linalg.norm(desc - _item_descriptor(item, features, descriptors), axis=1)
            if "box" not in item and int(item["axis"]) == axis:
                gap = np.abs(np.arange(len(desc)) - int(item["index"]))
                dist = dist * np.minimum(1.0, gap / (2.0 * features.patch[axis])) + gap * 1e-6
            nearest = np.minimum(nearest, dist)
        out.append(nearest)
    top = max(float(d.max()) for d in out)
    return [d / top if top > 0 else np.ones_like(d) for d in out]


def rank_slices(features: VoxelFeatures, head: LightHead | None, items: Sequence[Mapping[str, Any]], top: int = 5, stride: int = STRIDE) -> list[Suggestion]:
    """The ``top`` best slices over all three axes, best first (see the module docstring)."""
    axes, uncertainty = uncertainty_grid(features, head, stride)
    if head is None:
        uncertainty = tissue_grid(features, stride).astype(np.float32)
    spread = diversity(features, items)
    taken = {item_key(i) for i in items}
    candidates = []
    for axis, n in enumerate(features.shape):
        nearest = np.abs(np.arange(n)[:, None] - axes[axis][None]).argmin(1)  # each slice's closest grid row
        per_slice = np.moveaxis(uncertainty, axis, 0).reshape(len(axes[axis]), -1).mean(1)[nearest]
        score = per_slice * (DIVERSITY_FLOOR + (1 - DIVERSITY_FLOOR) * spread[axis])
        for index in np.argsort(-score)[: top + len(taken)]:
            if ("slice", axis, int(index)) in taken:
                continue
            if head is None:
                reason = f"cold start: {per_slice[index]:.0%} of this {AXIS_NAMES[axis]} slice is tissue"
            else:
                reason = f"uncertainty {per_slice[index]:.2f} (entropy / log K)"
            reason += f", diversity {spread[axis][index]:.2f} from {len(items)} corrected" if items else ""
            candidates.append(Suggestion(axis, int(index), float(score[index]), reason))
    return sorted(candidates, key=lambda s: -s.score)[:top]
