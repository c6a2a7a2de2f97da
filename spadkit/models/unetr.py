"""SPAD-UNETR: a UNETR-style segmentation decoder over SPAD-ViT that follows the spacing rule.

The skip path is UNETR's (Hatamizadeh et al., arXiv 2103.10504): four
intermediate token maps of the ViT (blocks ``D/4, D/2, 3D/4, D``) are brought
back to 1/8, 1/4 and 1/2 of the input resolution by stride-2 transposed
convolutions and merged, coarse to fine, with a convolutional stem on the
input itself. What is new is that every up-sampling is the *inverse* of the
spacing rule: a :class:`~spadkit.models.spad.SpadConvTranspose3d` at in-plane
level ``L`` doubles depth only where the patch embedding halved it, and every
3x3x3 convolution acts as 1x3x3 while depth is still coarser than in-plane
(:class:`~spadkit.models.spad.SpadConv3d`). One set of weights therefore
segments isotropic 3D, anisotropic 3D (0.7x0.7x5 mm: 4x16x16 patches) and 2D
images (1x16x16), and the output grid always equals the input grid.

MONAI's ``UnetrUpBlock``/``UnetrPrUpBlock`` fix their transposed-convolution
stride when they are built; here the depth stride depends on the batch's
spacing, so the blocks are written with the spacing-adaptive convolutions
(their structure mirrors MONAI's ``UnetResBlock``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from spadkit.errors import SpadkitError
from spadkit.models.registry import create_model, load_pretrained, register_model
from spadkit.models.spad import SpadConv3d, SpadConvTranspose3d, batch_level
from spadkit.models.vit import PATCH_HALVINGS, SpadViT


def check_channels(model: nn.Module, x: torch.Tensor) -> None:
    """Raise a :class:`SpadkitError` naming the fix when ``x`` ``(B, C, Z, Y, X)`` has the wrong channel count."""
    expected = model.in_chans
    if x.ndim != 5 or x.shape[1] != expected:
        raise SpadkitError(
            f"the model takes (B, {expected}, Z, Y, X) images, got shape {tuple(x.shape)}",
            fix=f"pass {expected}-channel images (select or stack channels), or build the model with in_chans={x.shape[1] if x.ndim == 5 else 'C'} "
            "and fine-tune it (a pretrained patch embedding for another channel count cannot be loaded).",
        )


def load_backbone(name: str, pretrained: str | os.PathLike | None, in_chans: int, **kwargs: Any) -> SpadViT:
    """Build the registered ViT ``name``, loading ``pretrained`` (a :func:`save_pretrained` folder) if given.

    Raises:
        SpadkitError: the folder holds another architecture or another channel count.
    """
    if pretrained is None or torch.empty(()).is_meta:  # create_model's meta-device size check: no weights to load
        return create_model(name, in_chans=in_chans, **kwargs)
    _, cfg = load_pretrained(pretrained)
    if cfg.architecture != name:
        raise SpadkitError(
            f"the pretrained backbone is {cfg.architecture!r}, this model needs {name!r}",
            path=pretrained,
            fix=f"use the segmentation/classification variant built on {cfg.architecture!r}, or a backbone folder exported from {name!r}.",
        )
    if cfg.in_chans != in_chans:
        raise SpadkitError(
            f"the pretrained backbone takes {cfg.in_chans} channel(s), the model was asked for in_chans={in_chans}",
            path=pretrained,
            fix=f"build the model with in_chans={cfg.in_chans}, or pass backbone=None to train from scratch.",
        )
    return create_model(name, pretrained=pretrained, in_chans=in_chans, **kwargs)


def skip_indices(depth: int) -> tuple[int, int, int, int]:
    """UNETR's skip blocks for a ViT of ``depth`` blocks: the ends of its four quarters (2, 5, 8, 11 for 12)."""
    return tuple(max(0, (k * depth) // 4 - 1) for k in range(1, 5))


class SpadResBlock(nn.Module):
    """Two 3x3x3 spacing-adaptive convolutions with instance norm and a residual (MONAI's ``UnetResBlock``).

    Args:
        level: in-plane halvings of the block's input and output (it keeps the resolution).
    """

    def __init__(self, in_channels: int, out_channels: int, *, level: int):
        super().__init__()
        self.conv1 = SpadConv3d(in_channels, out_channels, 3, level=level, bias=False)
        self.conv2 = SpadConv3d(out_channels, out_channels, 3, level=level, bias=False)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.skip = None
        if in_channels != out_channels:
            self.skip = nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, bias=False), nn.InstanceNorm3d(out_channels, affine=True))

    def forward(self, x: torch.Tensor, aniso_level: int) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x, aniso_level)))
        out = self.norm2(self.conv2(out, aniso_level))
        return self.act(out + (x if self.skip is None else self.skip(x)))


class TokenUp(nn.Module):
    """A token map (level 4) brought up ``steps`` levels: per step a stride-2 spacing-adaptive
    transposed convolution and a residual block (UNETR's projection-upsampling path)."""

    def __init__(self, dim: int, out_channels: int, steps: int):
        super().__init__()
        levels = range(PATCH_HALVINGS, PATCH_HALVINGS - steps, -1)
        self.ups = nn.ModuleList(SpadConvTranspose3d(dim if i == 0 else out_channels, out_channels, 2, level=lv) for i, lv in enumerate(levels))
        self.blocks = nn.ModuleList(SpadResBlock(out_channels, out_channels, level=lv - 1) for lv in levels)

    def forward(self, tokens: torch.Tensor, aniso_level: int) -> torch.Tensor:
        for up, block in zip(self.ups, self.blocks):
            tokens = block(up(tokens, aniso_level), aniso_level)
        return tokens


class UpBlock(nn.Module):
    """Decoder step from level ``level`` to ``level - 1``: transposed convolution, concatenation
    with the skip, residual block (MONAI's ``UnetrUpBlock``, spacing-adaptive)."""

    def __init__(self, in_channels: int, out_channels: int, *, level: int):
        super().__init__()
        self.up = SpadConvTranspose3d(in_channels, out_channels, 2, level=level)
        self.block = SpadResBlock(2 * out_channels, out_channels, level=level - 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, aniso_level: int) -> torch.Tensor:
        return self.block(torch.cat([self.up(x, aniso_level), skip], dim=1), aniso_level)


class SpadUNETR(nn.Module):
    """Segmentation network: SPAD-ViT encoder, UNETR skip decoder, voxel logits on the input grid.

    Args:
        backbone: the encoder (its ``in_chans`` is the model's).
        num_classes: output channels (logits; background is a class).
        feature_size: channels at full resolution; 2x, 4x, 8x at levels 1, 2, 3 (UNETR's 16 for ViT-B).
        dropout: channel dropout (``nn.Dropout3d``) before the voxel classifier; > 0 also enables
            Monte-Carlo dropout uncertainty in :func:`spadkit.infer.predict`.

    Shapes: ``forward(x (B, C, Z, Y, X), spacing (B, 3) or (3,) mm) -> (B, num_classes, Z, Y, X)``;
    ``Z, Y, X`` multiples of the patch :func:`~spadkit.models.patch_shape` of the batch's level.
    """

    def __init__(self, backbone: SpadViT, num_classes: int = 2, feature_size: int = 16, dropout: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise SpadkitError(f"num_classes must be >= 1, got {num_classes}", fix="count the background as a class: 2 for a binary mask.")
        if not 0.0 <= dropout < 1.0:
            raise SpadkitError(f"dropout must lie in [0, 1), got {dropout}", fix="use e.g. dropout=0.1 (0 disables it).")
        self.backbone = backbone
        self.in_chans, self.num_classes, self.feature_size = backbone.in_chans, num_classes, feature_size
        self.skip_indices = skip_indices(len(backbone.blocks))
        dim, f = backbone.embed_dim, feature_size
        self.encoder0 = SpadResBlock(backbone.in_chans, f, level=0)
        self.encoder1 = TokenUp(dim, 2 * f, steps=3)
        self.encoder2 = TokenUp(dim, 4 * f, steps=2)
        self.encoder3 = TokenUp(dim, 8 * f, steps=1)
        self.decoder3 = UpBlock(dim, 8 * f, level=4)
        self.decoder2 = UpBlock(8 * f, 4 * f, level=3)
        self.decoder1 = UpBlock(4 * f, 2 * f, level=2)
        self.decoder0 = UpBlock(2 * f, f, level=1)
        self.dropout = nn.Dropout3d(dropout)
        self.head = nn.Conv3d(f, num_classes, 1)

    def forward(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float]) -> torch.Tensor:
        check_channels(self, x)
        level = batch_level(spacing, x.shape[2])
        z1, z2, z3, z4 = self.backbone.forward_intermediates(x, spacing, self.skip_indices, norm=True)
        e0 = self.encoder0(x, level)
        e1, e2, e3 = self.encoder1(z1, level), self.encoder2(z2, level), self.encoder3(z3, level)
        d = self.decoder3(z4, e3, level)
        d = self.decoder2(d, e2, level)
        d = self.decoder1(d, e1, level)
        return self.head(self.dropout(self.decoder0(d, e0, level)))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the voxel classifier by a freshly initialised one for ``num_classes`` classes."""
        self.num_classes = num_classes
        self.head = nn.Conv3d(self.feature_size, num_classes, 1).to(self.head.weight.device)


#: UNETR feature size per backbone (UNETR's 16 for ViT-B; 8 keeps the test model tiny).
FEATURE_SIZES = {"spad_vit_test": 8, "spad_vit_small": 16, "spad_vit_base": 16}


def _register(name: str, vit: str) -> None:
    def build(
        num_classes: int = 2, in_chans: int = 1, backbone: str | os.PathLike | None = None, feature_size: int | None = None, dropout: float = 0.0, **kwargs: Any
    ) -> SpadUNETR:
        encoder = load_backbone(vit, backbone, in_chans, **kwargs)
        return SpadUNETR(encoder, num_classes=num_classes, feature_size=feature_size or FEATURE_SIZES[vit], dropout=dropout)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"SPAD-UNETR on ``{vit}``; ``backbone``: a pretrained ViT folder (``save_pretrained`` output)."
    register_model(build)


for _size in ("test", "small", "base"):
    _register(f"spad_unetr_{_size}", f"spad_vit_{_size}")
