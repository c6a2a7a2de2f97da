"""Augmentation of a whole batch on its device (GPU when there is one), with recorded parameters.

Per-sample transforms (MONAI's, TorchIO's) run inside loader workers on the
CPU; these run after the batch reached the device, vectorised over the batch,
so the reader threads only read. Every sampled parameter is written into
``batch["augment"]`` so a training step can be replayed or inspected, and the
parameters derive from the batch's global draw key and the seed
(:func:`batch_seed`), so a resumed run draws the same ones and DDP ranks draw
different ones. Rotations and flips also update the batch's ``affine`` and
``origin``, so an augmented patch still maps each voxel to the world point it
was sampled from, and the boxes of a joint batch (``batch["boxes"]``, a list of
``(n, 7)`` rows ``[class, z0, y0, x0, z1, y1, x1]``) follow their voxels
(:mod:`spadkit.data.boxes`).

PUMIT's pretraining augmentation is :meth:`BatchAugment.pumit`. Its zoom is not
here: zooming out needs voxels outside the crop, so token-grid crops zoom when
they are read (:class:`~spadkit.data.PatchSize` with ``tokens``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from spadkit.data.boxes import flip_matrix, map_boxes, rotation_matrix

Range = tuple[float, float]


class BatchAugment(torch.nn.Module):
    """Random rotation, flips and intensity changes for ``(B, C, Z, Y, X)`` batches.

    Applied in PUMIT's order, each sample independently:

    1. rotation about the patch centre with probability ``rotate_prob``: an in-plane
       angle (about the depth axis) uniform in ``+-rotate_range``, and for
       near-isotropic 3D patches (depth spacing <= ``isotropic_ratio`` x the finest
       in-plane spacing) tilts about the Y and X axes uniform in ``+-tilt_range``
       (MONAI's composition ``R_x R_y R_z``, in mm, so anisotropic voxels rotate
       correctly). Images are resampled trilinearly, labels by nearest voxel; corners
       that come from outside the patch take the sample's channel minimum (label 0):
       unlike PUMIT's lazy resampling, a batch holds only the crop;
    2. flip each spatial axis with probability ``flip_prob`` (image and label);
    3. ``x -> x * s`` with ``s`` from ``scale`` with probability ``intensity_prob``, and
       ``x -> x + t`` with ``t`` from ``shift`` with probability ``shift_prob``
       (``None``: together with the scale, one draw);
    4. clamp to ``clamp`` (PUMIT: [0, 1], the range of percentile intensities);
    5. contrast: ``x -> mean + f * (x - mean)`` (per-channel mean of the sample) with
       ``f`` from ``contrast`` with probability ``contrast_prob``, clamped again;
    6. gamma with probability ``gamma_prob``: ``x -> lo + (hi - lo) * u ** g`` for
       ``u = (x - lo) / (hi - lo)``, where ``lo, hi`` is the clamp range (PUMIT's
       ``x ** g`` on [0, 1]) or, without clamping, the sample's channel min and max;
       with probability ``gamma_invert_prob`` inverted: ``u -> 1 - (1 - u) ** g``.

    Args:
        flip_prob: per-axis flip probability; ``flip_axes`` picks the axes (0 = Z).
        flip_axes: spatial axes that may flip (a 1-slice patch never flips Z).
        gamma: range of ``g``; ``gamma_sampling`` ``"log"`` (log-uniform) or ``"uniform"`` (PUMIT).
        gamma_prob: probability of applying gamma.
        gamma_invert_prob: share of gamma changes applied to the inverted image (PUMIT 0.5).
        scale, shift: ranges of ``s`` and ``t`` (uniform).
        intensity_prob: probability of the scale (and of the shift when ``shift_prob`` is ``None``).
        shift_prob: probability of the shift on its own (PUMIT: 0).
        clamp: ``(low, high)`` intensity bounds after scale and shift, or ``None``.
        contrast: range of ``f``; ``contrast_prob`` its probability (PUMIT 0.15).
        rotate_prob: probability of a rotation (PUMIT 0.3); ``rotate_range``, ``tilt_range``
            in radians (PUMIT pi/2 and pi/6); ``isotropic_ratio`` see above (PUMIT 1.5).
        seed: combined with each batch's draw key to seed the parameters.

    The defaults keep spadkit's earlier recipe (flips, gamma, scale and shift; no
    rotation, clamp or contrast); :meth:`pumit` gives PUMIT's.
    """

    def __init__(
        self,
        flip_prob: float = 0.5,
        flip_axes: Sequence[int] = (0, 1, 2),
        gamma: Range = (0.7, 1.5),
        gamma_prob: float = 0.3,
        scale: Range = (0.75, 1.25),
        shift: Range = (-0.1, 0.1),
        intensity_prob: float = 0.5,
        seed: int = 0,
        *,
        gamma_sampling: Literal["log", "uniform"] = "log",
        gamma_invert_prob: float = 0.0,
        shift_prob: float | None = None,
        clamp: Range | None = None,
        contrast: Range = (0.75, 1.25),
        contrast_prob: float = 0.0,
        rotate_prob: float = 0.0,
        rotate_range: float = math.pi / 2,
        tilt_range: float = math.pi / 6,
        isotropic_ratio: float = 1.5,
    ):
        super().__init__()
        probabilities = {"flip_prob": flip_prob, "gamma_prob": gamma_prob, "intensity_prob": intensity_prob, "gamma_invert_prob": gamma_invert_prob}
        probabilities.update(contrast_prob=contrast_prob, rotate_prob=rotate_prob, shift_prob=0.0 if shift_prob is None else shift_prob)
        for name, p in probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")
        ranges = {"gamma": gamma, "scale": scale, "shift": shift, "contrast": contrast, **({"clamp": clamp} if clamp is not None else {})}
        for name, (lo, hi) in ranges.items():
            if lo > hi or (name == "gamma" and lo <= 0):
                raise ValueError(f"{name} range must be (low, high) with low <= high{' and low > 0' if name == 'gamma' else ''}, got {(lo, hi)}")
        if any(a not in (0, 1, 2) for a in flip_axes):
            raise ValueError(f"flip_axes are spatial axes 0 (Z), 1 (Y), 2 (X); got {tuple(flip_axes)}")
        if gamma_sampling not in ("log", "uniform"):
            raise ValueError(f"gamma_sampling must be 'log' or 'uniform', not {gamma_sampling!r}")
        self.flip_prob, self.flip_axes = flip_prob, tuple(flip_axes)
        self.gamma, self.gamma_prob, self.gamma_sampling, self.gamma_invert_prob = gamma, gamma_prob, gamma_sampling, gamma_invert_prob
        self.scale, self.shift, self.intensity_prob, self.shift_prob = scale, shift, intensity_prob, shift_prob
        self.clamp, self.contrast, self.contrast_prob = clamp, contrast, contrast_prob
        self.rotate_prob, self.rotate_range, self.tilt_range, self.isotropic_ratio = rotate_prob, rotate_range, tilt_range, isotropic_ratio
        self.seed = seed

    @classmethod
    def pumit(cls, seed: int = 0) -> BatchAugment:
        """PUMIT's pretraining augmentation (function2-llx/PUMIT ``TransformConf`` and
        ``conf/model/data.yaml``): rotation p 0.3 (+-90 degrees in-plane, +-30 degree tilts
        for near-isotropic data), flips p 0.5 per axis, scale 0.75-1.25 p 0.15, no shift,
        clamp to [0, 1], contrast 0.75-1.25 p 0.15, gamma 0.7-1.5 (uniform) p 0.3, half of
        it inverted."""
        return cls(
            flip_prob=0.5,
            gamma=(0.7, 1.5),
            gamma_prob=0.3,
            scale=(0.75, 1.25),
            intensity_prob=0.15,
            seed=seed,
            gamma_sampling="uniform",
            gamma_invert_prob=0.5,
            shift_prob=0.0,
            clamp=(0.0, 1.0),
            contrast=(0.75, 1.25),
            contrast_prob=0.15,
            rotate_prob=0.3,
        )

    def sample(self, batch_size: int, channels: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw the parameters of one batch (on the CPU, so every device draws the same).

        ``rotate`` holds the angles ``(B, 3)`` in radians about the array axes
        (Z, Y, X); tilts about Y and X are zeroed later for patches that are not
        near-isotropic.
        """

        def uniform(shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=torch.float64)

        def chance(p: float) -> torch.Tensor:
            return torch.rand((batch_size, 1), generator=generator) < p

        flip = torch.rand((batch_size, 3), generator=generator) < self.flip_prob
        flip[:, [a for a in (0, 1, 2) if a not in self.flip_axes]] = False
        if self.gamma_sampling == "log":
            gamma = torch.exp(uniform((batch_size, channels), math.log(self.gamma[0]), math.log(self.gamma[1])))
        else:
            gamma = uniform((batch_size, channels), *self.gamma)
        gamma = torch.where(chance(self.gamma_prob), gamma, 1.0)
        on = chance(self.intensity_prob)
        shift_on = on if self.shift_prob is None else chance(self.shift_prob)
        scale = torch.where(on, uniform((batch_size, channels), *self.scale), 1.0)
        shift = torch.where(shift_on, uniform((batch_size, channels), *self.shift), 0.0)
        # draws added after spadkit's first recipe come last, so its parameters keep their values
        invert = chance(self.gamma_invert_prob)[:, 0] & (gamma != 1).any(dim=1)
        contrast = torch.where(chance(self.contrast_prob), uniform((batch_size, 1), *self.contrast), 1.0)[:, 0]
        limits = torch.tensor([self.rotate_range, self.tilt_range, self.tilt_range], dtype=torch.float64)
        rotate = torch.where(chance(self.rotate_prob), (2 * uniform((batch_size, 3), 0.0, 1.0) - 1) * limits, 0.0)
        return {
            "flip": flip,
            "gamma": gamma.float(),
            "gamma_invert": invert,
            "scale": scale.float(),
            "shift": shift.float(),
            "contrast": contrast.float(),
            "rotate": rotate,
        }

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Augment ``batch["image"]`` (and ``batch["label"]``) in place; return the batch
        with the parameters under ``batch["augment"]``."""
        image = batch["image"]
        b, c, depth = image.shape[:3]
        generator = torch.Generator().manual_seed(batch_seed(self.seed, batch))
        params = self.sample(b, c, generator)
        if depth == 1:
            params["flip"][:, 0] = False
            params["rotate"][:, 1:] = 0.0
        rows = torch.nonzero(params["rotate"].abs().sum(dim=1) > 0).flatten()
        if len(rows):
            params["rotate"] = params["rotate"].to(image.device)
            _rotate(batch, rows.to(image.device), params["rotate"], self.isotropic_ratio)
        for axis in range(3):
            rows = torch.nonzero(params["flip"][:, axis]).flatten().to(image.device)
            if len(rows):
                image[rows] = image[rows].flip(axis + 2)
                if "label" in batch:
                    batch["label"][rows] = batch["label"][rows].flip(axis + 2)
                if "boxes" in batch:
                    _map_sample_boxes(batch, rows, [flip_matrix(axis, image.shape[axis + 2])] * len(rows))
                if "affine" in batch:
                    _flip_affines(batch, rows, axis, image.shape[axis + 2])
        self._intensity(image, {k: v.to(image.device) for k, v in params.items() if k not in ("flip", "rotate")})
        batch["augment"] = params
        return batch

    def _intensity(self, image: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
        """Steps 3-6 of the class docstring, in place."""
        image.mul_(params["scale"][..., None, None, None]).add_(params["shift"][..., None, None, None])
        if self.clamp is not None:
            image.clamp_(*self.clamp)
        if not torch.all(params["contrast"] == 1):
            factor = params["contrast"][:, None, None, None, None]
            mean = image.mean(dim=(2, 3, 4), keepdim=True)
            image.mul_(factor).add_(mean * (1 - factor))
            if self.clamp is not None:
                image.clamp_(*self.clamp)
        if torch.all(params["gamma"] == 1):
            return
        if self.clamp is not None:
            lo, span = image.new_tensor(self.clamp[0]), image.new_tensor(self.clamp[1] - self.clamp[0]).clamp_min(1e-8)
        else:
            lo = image.amin(dim=(2, 3, 4), keepdim=True)
            span = (image.amax(dim=(2, 3, 4), keepdim=True) - lo).clamp_min(1e-8)
        unit = ((image - lo) / span).clamp(0, 1)
        invert = params["gamma_invert"][:, None, None, None, None]
        unit = torch.where(invert, 1 - unit, unit) ** params["gamma"][..., None, None, None]
        image.copy_(lo + span * torch.where(invert, 1 - unit, unit))


def rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 3)`` rotations in array axes (Z, Y, X) for angles ``(B, 3)`` about Z, Y and X:
    ``R_X @ R_Y @ R_Z`` (MONAI's ``create_rotate`` order, first about the depth axis)."""
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def rot(i: int, a: int, b: int) -> torch.Tensor:  # rotation in the plane of axes a, b
        m = torch.stack([one, zero, zero, zero, one, zero, zero, zero, one], dim=1).reshape(-1, 3, 3).clone()
        m[:, a, a], m[:, a, b], m[:, b, a], m[:, b, b] = cos[:, i], -sin[:, i], sin[:, i], cos[:, i]
        return m

    return rot(2, 0, 1) @ rot(1, 0, 2) @ rot(0, 1, 2)


def _rotate(batch: dict[str, Any], rows: torch.Tensor, angles: torch.Tensor, isotropic_ratio: float) -> None:
    """Rotate the samples ``rows`` about their centres in mm; keep ``affine`` and ``origin`` true.

    Delivered voxel ``v`` samples the old patch at ``u = c + T (v - c)`` with
    ``T = S^-1 R S`` (``S``: the spacing, ``c``: the centre), so the new affine is
    ``A T`` with the origin moved by ``A (c - T c)``.
    """
    image = batch["image"]
    shape = image.shape[2:]
    spacing = batch["spacing"][rows].to(device=image.device, dtype=torch.float64) if "spacing" in batch else image.new_ones((len(rows), 3), dtype=torch.float64)
    tilt_ok = (spacing[:, 0] <= isotropic_ratio * spacing[:, 1:].amin(dim=1)) & (shape[0] > 1)
    angles[rows, 1:] *= tilt_ok[:, None].to(angles.dtype)
    rotation = rotation_matrices(angles[rows])
    transform = rotation * spacing[:, None, :] / spacing[:, :, None]  # S^-1 R S
    # grid_sample works in normalised coordinates (align_corners=True): u_n = N u - 1 with N = 2 / (n - 1),
    # so about the centre theta = N T N^-1; a one-voxel axis has N = 1 (any value reads its only voxel)
    norm = torch.tensor([2.0 / (n - 1) if n > 1 else 1.0 for n in shape], dtype=torch.float64, device=image.device)
    theta = transform * norm[None, :, None] / norm[None, None, :]
    flat = shape[0] == 1  # one slice: rotate in 2D (tilts are zero), affine_grid warns on unit-size 3D grids
    theta = theta[:, 1:, 1:] if flat else theta
    theta = theta.flip(1, 2)  # affine_grid's coordinates are (x, y[, z])
    theta = torch.cat([theta, theta.new_zeros(len(rows), theta.shape[1], 1)], dim=2).to(image.dtype)
    grid = F.affine_grid(theta, [len(rows), 1, *shape[int(flat) :]], align_corners=True)

    def sample(values: torch.Tensor, mode: str) -> torch.Tensor:
        values = values[:, :, 0] if flat else values
        out = F.grid_sample(values.to(grid.dtype), grid, mode=mode, padding_mode="zeros", align_corners=True)
        return out[:, :, None] if flat else out

    low = image[rows].amin(dim=(2, 3, 4), keepdim=True)
    image[rows] = sample(image[rows] - low, "bilinear") + low
    if "label" in batch:
        label = batch["label"]
        label[rows] = sample(label[rows], "nearest").round().to(label.dtype)
    if "boxes" in batch:
        _map_sample_boxes(batch, rows, [rotation_matrix(t, shape) for t in transform])
    if "affine" in batch:
        affine = batch["affine"]
        rows_a = rows.to(affine.device)
        old = affine[rows_a]
        transform = transform.to(old.device)
        centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=old.dtype, device=old.device)
        new = old.clone()
        new[:, :3, :3] = old[:, :3, :3] @ transform
        new[:, :3, 3] = old[:, :3, 3] + (old[:, :3, :3] @ (centre - transform @ centre).unsqueeze(-1)).squeeze(-1)
        affine[rows_a] = new
        if "origin" in batch:
            batch["origin"][rows_a] = new[:, :3, 3].to(batch["origin"].dtype)


def _map_sample_boxes(batch: dict[str, Any], rows: torch.Tensor, matrices: Sequence[np.ndarray]) -> None:
    """Map the boxes of the samples ``rows`` by their ``(4, 4)`` edge maps (one per row), in place in ``batch["boxes"]``."""
    shape = batch["image"].shape[2:]
    for row, matrix in zip(rows.tolist(), matrices):
        batch["boxes"][row] = map_boxes(batch["boxes"][row], matrix, shape)


def _flip_affines(batch: dict[str, Any], rows: torch.Tensor, axis: int, size: int) -> None:
    """Keep ``affine`` (and ``origin``) true to the flipped voxels: voxel ``i`` along the
    flipped array axis now holds what was at ``size - 1 - i``."""
    affine = batch["affine"]
    rows = rows.to(affine.device)
    column = axis  # batch affines follow the array axes (MONAI's convention, spadkit.data.geometry)
    flipped = affine[rows].clone()
    flipped[:, :3, 3] += flipped[:, :3, column] * (size - 1)
    flipped[:, :3, column] *= -1
    affine[rows] = flipped
    if "origin" in batch:
        batch["origin"][rows] = flipped[:, :3, 3].to(batch["origin"].dtype)


def batch_seed(seed: int, batch: dict[str, Any]) -> int:
    """A 63-bit seed for random draws on a batch (augmentation, masks).

    Uses the batch's global draw key ``(epoch, group, step)`` from its ``stream``
    entry (:class:`~spadkit.data.PatchStream`), which differs between DDP ranks and
    is the same when a run resumes or a fixed validation epoch replays; a hand-made
    batch without it draws as ``(0, 0, 0)``.
    """
    stream = batch.get("stream")
    values = [0, 0, 0] if stream is None else [int(stream[key][0]) for key in ("epoch", "group", "step")]
    digest = hashlib.sha256(repr((int(seed), values)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
