"""The annotation loop's fast path: a light voxel head on cached, frozen backbone features.

:func:`extract_features` runs the frozen backbone once per case and keeps

* the token features (``(F_t, gz, gy, gx)``, optionally reduced by PCA) at token
  resolution, up-sampled to voxels only when asked (trilinear, aligned as
  ``F.interpolate(..., align_corners=False)`` on the padded token grid), and
* a few cheap intensity features per channel (the intensity, Gaussian
  smoothings at 1 and 3 mm, the gradient magnitude at 1 mm; spacing-aware),
  computed slab by slab along Z and stored as float16.

So a 197x233x189 MNI152 volume costs ~70 MB of intensity features and a few
hundred KB of token features, and any voxel's feature vector is available
without materialising a ``(F, Z, Y, X)`` float volume. :func:`fit_light_head`
trains a logistic regression or a small MLP on the *annotated* voxels only
(unannotated voxels are unknown, never background); :func:`predict_light_head`
returns class probabilities for the volume or a region.

Images must be normalised the way the backbone was pretrained (see its
``pretrained_cfg.intensity``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spadkit.errors import SpadkitError
from spadkit.models.spad import batch_level
from spadkit.models.vit import patch_shape

#: Gaussian scales (mm) of the intensity features, and the scale of the gradient magnitude.
SMOOTHING_MM = (1.0, 3.0)
GRADIENT_MM = 1.0
#: Below this many voxels a Gaussian is skipped along an axis (a thick-slice or 2D depth).
MIN_SIGMA_VOXELS = 0.3


@dataclasses.dataclass
class VoxelFeatures:
    """Cached per-voxel features of one image (see the module docstring).

    Attributes:
        tokens: ``(F_t, gz, gy, gx)`` float16 token features.
        intensity: ``(F_i, Z, Y, X)`` float16 intensity features.
        patch: voxels per token ``(dz, dy, dx)``.
        spacing: ``(Z, Y, X)`` mm.
    """

    tokens: torch.Tensor
    intensity: torch.Tensor
    patch: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The image grid ``(Z, Y, X)``."""
        return tuple(self.intensity.shape[1:])

    @property
    def num_features(self) -> int:
        return self.tokens.shape[0] + self.intensity.shape[0]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Features ``(N, F)`` float32 at voxel indices ``index`` ``(N, 3)`` (z, y, x)."""
        index = torch.as_tensor(index, dtype=torch.long)
        out = torch.zeros(len(index), self.tokens.shape[0])
        corners = [_axis_weights(index[:, a], self.patch[a], self.tokens.shape[1 + a]) for a in range(3)]
        tokens = self.tokens.float()
        for iz, wz in zip(*corners[0]):
            for iy, wy in zip(*corners[1]):
                for ix, wx in zip(*corners[2]):
                    out += tokens[:, iz, iy, ix].T * (wz * wy * wx)[:, None]
        intensity = self.intensity[:, index[:, 0], index[:, 1], index[:, 2]].T.float()
        return torch.cat([out, intensity], dim=1)

    def region(self, region: Sequence[slice] | None = None) -> torch.Tensor:
        """Features ``(F, z, y, x)`` float32 of a box of the grid (default: all of it)."""
        boxes = _boxes(region, self.shape)
        tokens = self.tokens.float()
        for axis, box in enumerate(boxes):  # separable linear interpolation, x then y then z
            voxels = torch.arange(box.start, box.stop)
            (i0, i1), (w0, w1) = _axis_weights(voxels, self.patch[axis], self.tokens.shape[1 + axis])
            matrix = torch.zeros(len(voxels), tokens.shape[1 + axis])
            matrix.index_put_((torch.arange(len(voxels)), i0), w0, accumulate=True)
            matrix.index_put_((torch.arange(len(voxels)), i1), w1, accumulate=True)
            tokens = torch.movedim(torch.movedim(tokens, 1 + axis, -1) @ matrix.T, -1, 1 + axis)
        return torch.cat([tokens, self.intensity[(slice(None), *boxes)].float()], dim=0)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and numbers only: ``torch.save`` it beside the store, read it back with ``weights_only=True``."""
        return {"tokens": self.tokens, "intensity": self.intensity, "patch": torch.tensor(self.patch), "spacing": torch.tensor(self.spacing, dtype=torch.float64)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> VoxelFeatures:
        return cls(state["tokens"], state["intensity"], tuple(int(p) for p in state["patch"]), tuple(float(s) for s in state["spacing"]))


def _axis_weights(voxels: torch.Tensor, patch: int, grid: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Neighbouring token indices and linear weights of voxel centres (``align_corners=False`` convention)."""
    pos = ((voxels.double() + 0.5) / patch - 0.5).clamp(min=0.0)
    i0 = pos.floor().long().clamp(max=grid - 1)
    w1 = (pos - i0).float().clamp(0.0, 1.0)
    i1 = (i0 + 1).clamp(max=grid - 1)
    return (i0, i1), (1.0 - w1, w1)


def _boxes(region: Sequence[slice] | None, shape: Sequence[int]) -> tuple[slice, ...]:
    region = tuple(region or ()) + (slice(None),) * (3 - len(tuple(region or ())))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(region, shape))


# ---------------------------------------------------------------------- extraction
def image_and_spacing(image: Any, spacing: Sequence[float] | None) -> tuple[Any, tuple[float, float, float]]:
    """Accept a ``(C, Z, Y, X)`` array/tensor with ``spacing``, or a spadkit ``Volume`` (duck-typed:
    ``array``, ``affine`` and ``spacing``; its own spacing unless ``spacing`` is given)."""
    is_volume = all(hasattr(image, name) for name in ("array", "affine", "spacing"))
    if spacing is None:
        if not is_volume:
            raise SpadkitError("no spacing given for a plain array", fix="pass spacing=(z, y, x) in mm, or a spadkit Volume.")
        spacing = image.spacing
    array = image.array if is_volume else image
    if len(array.shape) != 4:
        raise SpadkitError(f"expected a (C, Z, Y, X) image, got shape {tuple(array.shape)}", fix="add the channel axis: image[None].")
    return array, tuple(float(s) for s in spacing)


def _read_rows(array: Any, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` along Z of a ``(C, Z, Y, X)`` array, edge rows repeated outside the volume."""
    depth = array.shape[1]
    lo, hi = max(start, 0), min(stop, depth)
    rows = torch.as_tensor(np.asarray(array[:, lo:hi]), dtype=torch.float32)
    return torch.cat([rows[:, :1]] * (lo - start) + [rows] + [rows[:, -1:]] * (stop - hi), dim=1)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    return kernel / kernel.sum()


def _blur(x: torch.Tensor, sigmas: Sequence[float], valid_z: bool) -> torch.Tensor:
    """Separable Gaussian of ``x`` ``(C, Z, Y, X)``; in-plane edges replicated; along Z the caller's halo is consumed
    (``valid_z``: output has ``2 * radius_z`` fewer rows)."""
    for axis, sigma in enumerate(sigmas):
        if sigma < MIN_SIGMA_VOXELS:
            continue
        kernel = _gaussian_kernel(sigma)
        radius = len(kernel) // 2
        moved = torch.movedim(x, 1 + axis, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        if not (axis == 0 and valid_z):
            flat = F.pad(flat, (radius, radius), mode="replicate")
        moved = F.conv1d(flat, kernel.view(1, 1, -1)).reshape(*moved.shape[:-1], -1)
        x = torch.movedim(moved, -1, 1 + axis)
    return x


def _halo(sigma_voxels: float) -> int:
    return max(1, math.ceil(3 * sigma_voxels)) if sigma_voxels >= MIN_SIGMA_VOXELS else 0


def intensity_features(image: Any, spacing: Sequence[float], slab: int = 32) -> torch.Tensor:
    """``(4 * C, Z, Y, X)`` float16: per channel the intensity, Gaussians at :data:`SMOOTHING_MM`, and the
    gradient magnitude (per mm) of the :data:`GRADIENT_MM` Gaussian; computed ``slab`` Z rows at a time."""
    array, spacing = image_and_spacing(image, spacing)
    channels, depth = array.shape[0], array.shape[1]
    scales = [tuple(s / sp for sp in spacing) for s in (*SMOOTHING_MM, GRADIENT_MM)]
    out = torch.empty((4 * channels, *array.shape[1:]), dtype=torch.float16)
    for z0 in range(0, depth, slab):
        z1 = min(z0 + slab, depth)
        maps = [_read_rows(array, z0, z1)]
        for k, sigmas in enumerate(scales):
            grad = k == len(scales) - 1
            extra = (1 if grad and depth > 1 else 0) + _halo(sigmas[0])
            blurred = _blur(_read_rows(array, z0 - extra, z1 + extra), sigmas, valid_z=True)
            if not grad:
                maps.append(blurred)
                continue
            padded = F.pad(blurred, (1, 1, 1, 1), mode="replicate")
            gy = (padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]) / (2 * spacing[1])
            gx = (padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2]) / (2 * spacing[2])
            squared = gy**2 + gx**2
            if depth > 1:
                squared = squared[:, 1:-1] + ((blurred[:, 2:] - blurred[:, :-2]) / (2 * spacing[0])) ** 2
            maps.append(squared.sqrt())
        out[:, z0:z1] = torch.stack(maps, dim=1).reshape(4 * channels, z1 - z0, *array.shape[2:]).half()
    return out


def _token_windows(grid: Sequence[int], max_tokens: int) -> list[tuple[slice, slice, slice]]:
    """Split a token grid into near-equal boxes of at most ``max_tokens`` tokens (the longest axis split first)."""
    splits = [1, 1, 1]
    while math.prod(math.ceil(g / s) for g, s in zip(grid, splits)) > max_tokens:
        axis = max(range(3), key=lambda a: math.ceil(grid[a] / splits[a]))
        if math.ceil(grid[axis] / splits[axis]) == 1:
            break
        splits[axis] += 1
    steps = [math.ceil(g / s) for g, s in zip(grid, splits)]
    return [
        (slice(z, min(z + steps[0], grid[0])), slice(y, min(y + steps[1], grid[1])), slice(x, min(x + steps[2], grid[2])))
        for z in range(0, grid[0], steps[0])
        for y in range(0, grid[1], steps[1])
        for x in range(0, grid[2], steps[2])
    ]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    image: Any,
    spacing: Sequence[float] | None = None,
    *,
    layers: Sequence[int] = (-1,),
    components: int | None = 32,
    max_tokens: int = 4096,
    device: str | torch.device = "cpu",
) -> VoxelFeatures:
    """Cache a frozen backbone's features of one image.

    Args:
        model: a SPAD-ViT, or any model with a ``backbone`` SPAD-ViT (SPAD-UNETR, classifier).
        image: ``(C, Z, Y, X)`` numpy/zarr/dask array or tensor (read window by window), or a ``Volume``.
        spacing: ``(Z, Y, X)`` mm (taken from a ``Volume`` when omitted).
        layers: blocks whose normalised tokens are concatenated.
        components: PCA components kept of the token features (``None``: all).
        max_tokens: the backbone sees boxes of at most this many tokens (attention memory grows with its square).
        device: where the backbone runs.

    Returns:
        :class:`VoxelFeatures` (float16).
    """
    array, spacing = image_and_spacing(image, spacing)
    vit = getattr(model, "backbone", model)
    if array.shape[0] != vit.in_chans:
        raise SpadkitError(f"the model takes {vit.in_chans}-channel images, got {array.shape[0]}", fix=f"pass a {vit.in_chans}-channel image.")
    spatial = tuple(array.shape[1:])
    patch = patch_shape(batch_level(spacing, spatial[0]))
    grid = tuple(math.ceil(n / p) for n, p in zip(spatial, patch))
    was_training = vit.training
    vit.eval()
    tokens = None
    for box in _token_windows(grid, max_tokens):
        vox = [slice(b.start * p, b.stop * p) for b, p in zip(box, patch)]
        window = torch.as_tensor(np.asarray(array[:, vox[0], vox[1], vox[2]]), dtype=torch.float32)
        pad = [v.stop - v.start - n for v, n in zip(vox, window.shape[1:])]
        window = F.pad(window, (0, pad[2], 0, pad[1], 0, pad[0]))
        maps = vit.forward_intermediates(window[None].to(device), spacing, list(layers), norm=True)
        feat = torch.cat(maps, dim=1)[0].float().cpu()
        if tokens is None:
            tokens = torch.empty((feat.shape[0], *grid))
        tokens[(slice(None), *box)] = feat
    vit.train(was_training)
    if components is not None and components < tokens.shape[0]:
        tokens = _pca(tokens, components)
    return VoxelFeatures(tokens.half(), intensity_features(array, spacing), patch, spacing)


def _pca(tokens: torch.Tensor, components: int) -> torch.Tensor:
    """Project ``(C, gz, gy, gx)`` onto its first principal components, each scaled to unit variance."""
    flat = tokens.flatten(1).T.double()
    flat = flat - flat.mean(0)
    values, vectors = torch.linalg.eigh(flat.T @ flat / max(len(flat) - 1, 1))
    top = vectors[:, -components:].flip(1)
    projected = flat @ top / values[-components:].flip(0).clamp(min=1e-12).sqrt()
    return projected.T.float().reshape(components, *tokens.shape[1:])


# ---------------------------------------------------------------------- the light head
class LightHead(nn.Module):
    """Standardise features, then a linear layer (``hidden=0``) or a one-hidden-layer MLP: ``(N, F) -> (N, K)``."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        if hidden:
            self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        else:
            self.net = nn.Linear(num_features, num_classes)
        self.num_classes = num_classes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)


def fit_light_head(
    features: VoxelFeatures,
    labels: Any,
    mask: Any,
    *,
    num_classes: int | None = None,
    hidden: int = 32,
    steps: int = 100,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    max_voxels: int = 5000,
    seed: int = 0,
) -> LightHead:
    """Train a :class:`LightHead` on the annotated voxels only.

    Args:
        features: from :func:`extract_features`.
        labels: ``(Z, Y, X)`` integer classes; values outside ``mask`` are never read.
        mask: ``(Z, Y, X)`` bool, True where a person annotated (reviewed) the voxel.
        num_classes: classes (default: the largest annotated label + 1).
        hidden: MLP width (0: logistic regression).
        steps, lr, weight_decay: full-batch Adam on class-balanced cross-entropy.
        max_voxels: at most this many annotated voxels are used (a seeded random subset).
        seed: makes the fit reproducible.

    Raises:
        SpadkitError: empty mask, mask/labels not on the feature grid, labels >= ``num_classes``.
    """
    mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    labels = torch.as_tensor(np.asarray(labels))
    if tuple(mask.shape) != features.shape or tuple(labels.shape) != features.shape:
        raise SpadkitError(
            f"labels {tuple(labels.shape)} and mask {tuple(mask.shape)} must be on the feature grid {features.shape}",
            fix="pass (Z, Y, X) arrays of the image the features were extracted from.",
        )
    index = mask.nonzero()
    if len(index) == 0:
        raise SpadkitError("the annotated mask is empty: there is nothing to learn from", fix="annotate at least one slice (or some voxels) first.")
    generator = torch.Generator().manual_seed(seed)
    if len(index) > max_voxels:
        index = index[torch.randperm(len(index), generator=generator)[:max_voxels]]
    target = labels[index[:, 0], index[:, 1], index[:, 2]].long()
    num_classes = int(target.max()) + 1 if num_classes is None else num_classes
    if target.min() < 0 or target.max() >= num_classes:
        raise SpadkitError(
            f"annotated labels span {int(target.min())}..{int(target.max())}, outside 0..{num_classes - 1}",
            fix=f"pass num_classes={int(target.max()) + 1} or relabel the annotation.",
        )
    x = features.gather(index)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LightHead(x.shape[1], max(num_classes, 2), hidden)
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0).clamp(min=1e-6) if len(x) > 1 else torch.ones(x.shape[1]))
    counts = torch.bincount(target, minlength=head.num_classes).float()
    weight = torch.where(counts > 0, counts.sum() / (counts * (counts > 0).sum()).clamp(min=1), torch.zeros_like(counts))
    standardised = (x - head.mean) / head.std  # once, not per step
    optimizer = torch.optim.Adam(head.net.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(head.net(standardised), target, weight=weight).backward()
        optimizer.step()
    return head.eval()


@torch.no_grad()
def predict_light_head(head: LightHead, features: VoxelFeatures, region: Sequence[slice] | None = None, slab: int = 8) -> torch.Tensor:
    """Class probabilities ``(K, z, y, x)`` float32 of the whole grid or a box of it, ``slab`` Z rows at a time."""
    boxes = _boxes(region, features.shape)
    chunks = []
    for z0 in range(boxes[0].start, boxes[0].stop, slab):
        part = features.region((slice(z0, min(z0 + slab, boxes[0].stop)), *boxes[1:]))
        logits = head(part.flatten(1).T)
        chunks.append(logits.softmax(1).T.reshape(-1, *part.shape[1:]))
    return torch.cat(chunks, dim=1)
