"""Network arms of the label-efficiency benchmark: few-shot training on partially labelled slices.

Every network trains the same way (so only the initialisation and the architecture
differ between arms): ``steps`` AdamW steps on batches of patches cut around the
labelled slices, the loss masked to the annotated voxels (MONAI's masked Dice +
cross-entropy, as :meth:`spadkit.tasks.SegFinetune.loss`: unannotated voxels are
unknown, never background), linear warm-up then cosine decay; then a sliding-window
prediction of the whole (padded) volume in windows of the training patch (MONAI's
``sliding_window_inference``, overlap 0.5, Gaussian blending: what ``spadkit.infer.predict``
computes, and nnU-Net's protocol). One forward over the whole volume would not do:
instance normalisation then sees other statistics than in training, which cost MONAI's
UNet gray-matter Dice 0.63 -> 0.24 at k = 4 in a test. The pretrained SPAD-UNETR trains with
layer-wise learning-rate decay (BEiT/MAE fine-tuning, :func:`spadkit.tasks.finetune.param_groups`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import MaskedDiceLoss
from torch import nn

from spadkit.models import create_model
from spadkit.models.spad import batch_level
from spadkit.models.vit import patch_shape
from spadkit.tasks.finetune import param_groups


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How every network arm trains.

    Attributes:
        steps: optimiser steps.
        batch: patches per step.
        patch_mm: patch extent ``(Z, Y, X)`` in mm (rounded up to the model's patch multiple in voxels).
        lr: peak learning rate; warmup: linear warm-up steps.
        layer_decay: layer-wise decay of the pretrained backbone's learning rate.
        weight_decay: AdamW.
    """

    steps: int = 100
    batch: int = 1
    patch_mm: tuple[float, float, float] = (32.0, 64.0, 64.0)
    lr: float = 2e-3
    warmup: int = 5
    layer_decay: float = 0.75
    weight_decay: float = 0.01


def masked_loss(
    logits: torch.Tensor, label: torch.Tensor, annotated: torch.Tensor, dice: MaskedDiceLoss
) -> torch.Tensor:
    """Masked Dice + cross-entropy over annotated voxels: ``logits (B, K, Z, Y, X)``, ``label``/``annotated`` ``(B, 1, Z, Y, X)``."""
    mask = annotated.float()
    target = F.one_hot(label[:, 0], logits.shape[1]).movedim(-1, 1).float()
    ce = (F.cross_entropy(logits, label[:, 0], reduction="none") * mask[:, 0]).sum() / mask.sum()
    return dice(logits, target, mask) + ce


def multiple_of(spacing: Sequence[float], depth: int, pyramid: int) -> tuple[int, int, int]:
    """Voxels each axis must be a multiple of: the SPAD patch of this spacing, and ``pyramid`` for other nets."""
    patch = patch_shape(batch_level(spacing, depth))
    return tuple(math.lcm(p, pyramid) for p in patch)


def pad_to(array: np.ndarray, multiple: Sequence[int], value: float = 0.0) -> np.ndarray:
    """Pad the last three axes at their end up to ``multiple``."""
    pad = [(0, 0)] * (array.ndim - 3) + [(0, -n % m) for n, m in zip(array.shape[-3:], multiple)]
    return np.pad(array, pad, constant_values=value)


class PatchSampler:
    """Patches ``(B, 1, z, y, x)`` that each hold annotated voxels (a labelled slice crosses every patch).

    Args:
        image, labels, annotated: ``(Z, Y, X)`` arrays, padded to at least the patch size.
        slices: the labelled axial slices.
        patch: voxels ``(z, y, x)``.
        seed: the sampling seed.
    """

    def __init__(
        self,
        image: np.ndarray,
        labels: np.ndarray,
        annotated: np.ndarray,
        slices: Sequence[int],
        patch: Sequence[int],
        seed: int,
    ):
        self.image, self.labels, self.annotated = image, labels, annotated
        self.slices, self.patch = list(slices), tuple(patch)
        self.rng = np.random.default_rng([seed, 11])

    def _box(self) -> tuple[slice, slice, slice]:
        for _ in range(100):
            z = self.slices[self.rng.integers(len(self.slices))]
            starts = [z - self.rng.integers(self.patch[0])] + [
                self.rng.integers(n - p + 1) for n, p in zip(self.image.shape[1:], self.patch[1:])
            ]
            starts[0] = int(np.clip(starts[0], 0, self.image.shape[0] - self.patch[0]))
            box = tuple(slice(s, s + p) for s, p in zip(starts, self.patch))
            if self.annotated[box].any():
                return box
        raise RuntimeError("no patch with annotated voxels found in 100 draws")

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes = [self._box() for _ in range(size)]
        stack = [
            torch.from_numpy(np.stack([a[b] for b in boxes])[:, None])
            for a in (self.image, self.labels, self.annotated)
        ]
        return stack[0].float(), stack[1].long(), stack[2].bool()


def train_and_predict(
    model: nn.Module,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    groups: list[dict],
    sampler: PatchSampler,
    volume: torch.Tensor,
    settings: TrainSettings,
) -> tuple[np.ndarray, float, float]:
    """Train ``model`` on ``sampler`` then predict ``volume`` ``(1, 1, Z, Y, X)`` window by window.

    Returns:
        ``(Z, Y, X)`` argmax classes, training seconds, prediction seconds.
    """
    start = time.perf_counter()
    for group in groups:
        group["lr"] = settings.lr * group.pop("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)

    def schedule(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        return 0.5 * (
            1
            + math.cos(
                math.pi * (step - settings.warmup) / max(settings.steps - settings.warmup, 1)
            )
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    dice = MaskedDiceLoss(include_background=False, softmax=True, batch=True)
    model.train()
    for _ in range(settings.steps):
        image, label, annotated = sampler.batch(settings.batch)
        loss = masked_loss(forward(model, image), label, annotated, dice)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    trained = time.perf_counter()
    model.eval()
    with torch.no_grad():
        logits = sliding_window_inference(
            volume, sampler.patch, 4, lambda x: forward(model, x), overlap=0.5, mode="gaussian"
        )
    return logits.argmax(1)[0].numpy(), trained - start, time.perf_counter() - trained


def spad_unetr(
    name: str, weights: str | None, num_classes: int, seed: int, layer_decay: float
) -> tuple[nn.Module, list[dict]]:
    """SPAD-UNETR ``name`` with its backbone from ``weights`` (or random init), seeded; AdamW groups with layer decay."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes, backbone=weights)
    return model, param_groups(
        model, weight_decay=0.01, layer_decay=layer_decay if weights else 1.0
    )


def monai_unet(
    num_classes: int, seed: int, channels: Sequence[int] = (8, 16, 32, 64)
) -> tuple[nn.Module, list[dict]]:
    """MONAI's residual UNet (isotropic strides 2), seeded; one AdamW group."""
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    model = UNet(
        3,
        1,
        num_classes,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
    )
    return model, [{"params": list(model.parameters())}]
