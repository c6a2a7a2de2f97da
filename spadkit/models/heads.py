"""Heads used in pretraining: code prediction, pixel reconstruction, and the auxiliary heads.

* :class:`CodeHead` predicts the tokenizer's code distribution per token (MIM).
* :class:`PixelHead` maps tokens back to voxels through a spacing-adaptive
  transposed patchify convolution, so one set of weights reconstructs
  16x16x16, 4x16x16 or 1x16x16 patches (MAE-style pixel targets).
* :class:`ModalityDiscriminator` classifies the modality through a gradient
  reversal layer: minimising its loss makes the backbone's features
  modality-invariant (domain-adversarial training, as in the Universal Model
  paper, arXiv 2010.06107).
* :class:`ScaleClassifier` predicts the physical scale bin of a crop.
"""

from __future__ import annotations

import torch
from torch import nn

from spadkit.models.spad import SpadConvTranspose3d
from spadkit.models.vit import PATCH, PATCH_HALVINGS


class CodeHead(nn.Module):
    """``(B, N, C)`` tokens -> ``(B, N, K)`` code logits (Linear, GELU, Linear)."""

    def __init__(self, dim: int, num_codes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_codes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


class PixelHead(nn.Module):
    """``(B, N, C)`` tokens on grid ``(gz, gy, gx)`` -> ``(B, out_chans, Z, Y, X)`` voxels."""

    def __init__(self, dim: int, out_chans: int):
        super().__init__()
        self.unpatch = SpadConvTranspose3d(dim, out_chans, PATCH, level=PATCH_HALVINGS)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int], aniso_level: int) -> torch.Tensor:
        maps = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        return self.unpatch(maps, aniso_level)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-strength`` backward."""
    return _ReverseGradient.apply(x, strength)


class _MLPClassifier(nn.Module):
    def __init__(self, dim: int, num_classes: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))


class ModalityDiscriminator(_MLPClassifier):
    """Modality logits ``(B, M)`` from pooled features ``(B, C)``, behind gradient reversal.

    Args:
        strength: gradient reversal factor (DANN's lambda).
    """

    def __init__(self, dim: int, num_modalities: int, strength: float = 1.0):
        super().__init__(dim, num_modalities)
        self.strength = strength

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(reverse_gradient(pooled, self.strength))


class ScaleClassifier(_MLPClassifier):
    """Scale-bin logits ``(B, S)`` from pooled features ``(B, C)``."""

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


def scale_bin(extent_mm: torch.Tensor, edges_mm: torch.Tensor) -> torch.Tensor:
    """Index of the bin of each crop's in-plane physical extent ``(B,)`` mm given bin edges."""
    return torch.bucketize(extent_mm, edges_mm)
