"""Augmentation of a whole batch on its device (GPU when there is one), with recorded parameters.

Per-sample transforms (MONAI's, TorchIO's) run inside loader workers on the
CPU; these run after the batch reached the device, vectorised over the batch,
so the reader threads only read. Every sampled parameter is written into
``batch["augment"]`` so a training step can be replayed or inspected, and the
parameters derive from the batch's global draw key and the seed
(:func:`batch_seed`), so a resumed run draws the same ones and DDP ranks draw
different ones. Flips also update the batch's ``affine`` and ``origin``,
so a flipped patch still maps its voxels to the right world position.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

Range = tuple[float, float]


class BatchAugment(torch.nn.Module):
    """Random flips, gamma, intensity scaling and shift for ``(B, C, Z, Y, X)`` batches.

    Applied in this order, each sample independently:

    1. flip each spatial axis with probability ``flip_prob`` (image and label);
    2. gamma: ``x -> lo + (hi - lo) * ((x - lo) / (hi - lo)) ** g`` with the sample's
       per-channel ``lo``/``hi``, with probability ``gamma_prob``;
    3. ``x -> x * s + t`` with ``s`` from ``scale`` and ``t`` from ``shift``, with
       probability ``intensity_prob`` (else ``s = 1, t = 0``).

    Args:
        flip_prob: per-axis flip probability; ``flip_axes`` picks the axes (0 = Z).
        flip_axes: spatial axes that may flip (a 1-slice patch never flips Z).
        gamma: range of ``g`` (log-uniform).
        gamma_prob: probability of applying gamma.
        scale, shift: ranges of ``s`` and ``t`` (uniform).
        intensity_prob: probability of applying scale and shift.
        seed: combined with each batch's ``position`` to seed the parameters.
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
    ):
        super().__init__()
        for name, p in (("flip_prob", flip_prob), ("gamma_prob", gamma_prob), ("intensity_prob", intensity_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")
        for name, (lo, hi) in (("gamma", gamma), ("scale", scale), ("shift", shift)):
            if lo > hi or (name == "gamma" and lo <= 0):
                raise ValueError(f"{name} range must be (low, high) with low <= high{' and low > 0' if name == 'gamma' else ''}, got {(lo, hi)}")
        if any(a not in (0, 1, 2) for a in flip_axes):
            raise ValueError(f"flip_axes are spatial axes 0 (Z), 1 (Y), 2 (X); got {tuple(flip_axes)}")
        self.flip_prob, self.flip_axes = flip_prob, tuple(flip_axes)
        self.gamma, self.gamma_prob = gamma, gamma_prob
        self.scale, self.shift, self.intensity_prob = scale, shift, intensity_prob
        self.seed = seed

    def sample(self, batch_size: int, channels: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw the parameters of one batch (on the CPU, so every device draws the same)."""

        def uniform(shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=torch.float64)

        flip = torch.rand((batch_size, 3), generator=generator) < self.flip_prob
        flip[:, [a for a in (0, 1, 2) if a not in self.flip_axes]] = False
        log_lo, log_hi = torch.log(torch.tensor(self.gamma, dtype=torch.float64))
        gamma = torch.exp(uniform((batch_size, channels), float(log_lo), float(log_hi)))
        gamma = torch.where(torch.rand((batch_size, 1), generator=generator) < self.gamma_prob, gamma, 1.0)
        on = torch.rand((batch_size, 1), generator=generator) < self.intensity_prob
        scale = torch.where(on, uniform((batch_size, channels), *self.scale), 1.0)
        shift = torch.where(on, uniform((batch_size, channels), *self.shift), 0.0)
        return {"flip": flip, "gamma": gamma.float(), "scale": scale.float(), "shift": shift.float()}

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Augment ``batch["image"]`` (and ``batch["label"]``) in place; return the batch
        with the parameters under ``batch["augment"]``."""
        image = batch["image"]
        b, c, depth = image.shape[:3]
        generator = torch.Generator().manual_seed(batch_seed(self.seed, batch))
        params = self.sample(b, c, generator)
        if depth == 1:
            params["flip"][:, 0] = False
        for axis in range(3):
            rows = torch.nonzero(params["flip"][:, axis]).flatten().to(image.device)
            if len(rows):
                image[rows] = image[rows].flip(axis + 2)
                if "label" in batch:
                    batch["label"][rows] = batch["label"][rows].flip(axis + 2)
                if "affine" in batch:
                    _flip_affines(batch, rows, axis, image.shape[axis + 2])
        gamma = params["gamma"].to(image.device)[..., None, None, None]
        if not torch.all(params["gamma"] == 1):
            lo = image.amin(dim=(2, 3, 4), keepdim=True)
            span = (image.amax(dim=(2, 3, 4), keepdim=True) - lo).clamp_min(1e-8)
            image.copy_(lo + span * ((image - lo) / span).clamp_min(0) ** gamma)
        image.mul_(params["scale"].to(image.device)[..., None, None, None]).add_(params["shift"].to(image.device)[..., None, None, None])
        batch["augment"] = params
        return batch


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
