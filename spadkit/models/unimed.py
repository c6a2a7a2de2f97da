"""UniMed's decoders over SPAD-ViT (Wang et al., "Universal Medical Image Representation Learning
with Compositional Decoders", arXiv 2409.19890).

* **Decomposed decoder** (:class:`UniMedDecoder`): a *pixel* decoder turns the backbone's
  intermediate token maps into a dense per-voxel embedding on the input grid, and a *semantic*
  decoder lets learnable queries (one per class, background included, plus optional extra
  queries that carry no label) cross-attend to the image tokens. Per query it predicts a
  presence logit and a mask embedding; a query's mask logits are the dot product of its mask
  embedding with every voxel's pixel embedding. The pixel decoder is built from SPAD-UNETR's
  spacing-adaptive blocks (:mod:`spadkit.models.unetr`), so one set of weights decodes 2D,
  isotropic and anisotropic inputs, and its output grid always equals the input grid.
* **Composed decoder** (:func:`compose_targets`): annotations of every level (voxel mask, box,
  image-level class; none) become one discrete target per sample and class query, each entry
  in ``{-1 unknown, 0 absent, 1 present}``: presence in the patch ``(B, K)``, voxels
  ``(B, K, Z, Y, X)``, and "at least one voxel of class c inside" bags from boxes. One loss
  (:func:`spadkit.tasks.unimed.composed_loss`) then supervises every level, and a sample with no
  labels has no known entry, so only the self-supervised loss reaches it.

Shapes: ``UniMedNet.forward(x (B, C, Z, Y, X), spacing (B, 3) or (3,) mm) -> UniMedOutput``.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from spadkit.errors import SpadkitError
from spadkit.models.registry import register_model
from spadkit.models.unetr import (
    FEATURE_SIZES,
    SpadResBlock,
    TokenUp,
    UpBlock,
    check_channels,
    load_backbone,
    skip_indices,
)
from spadkit.models.vit import SpadViT, resolve_level

#: Unknown / absent / present in :class:`ComposedTargets`.
UNKNOWN, ABSENT, PRESENT = -1, 0, 1


class UniMedOutput(NamedTuple):
    """What :class:`UniMedDecoder` predicts for a batch of ``B`` images and ``Q`` queries.

    Attributes:
        presence: ``(B, Q)`` logits, query ``q``'s class appears in the image.
        masks: ``(B, Q, Z, Y, X)`` mask logits on the input grid.
        pixels: ``(B, E, Z, Y, X)`` pixel embedding.
        queries: ``(B, Q, D)`` the semantic decoder's query features.
    """

    presence: torch.Tensor
    masks: torch.Tensor
    pixels: torch.Tensor
    queries: torch.Tensor


class PixelDecoder(nn.Module):
    """Dense per-voxel embedding from a SPAD-ViT's four skip maps: UNETR's skip path (as
    :class:`~spadkit.models.unetr.SpadUNETR`) up to in-plane level ``out_level`` (0: the input's
    resolution, 2: a quarter of it, as Mask2Former's mask features), a ``1x1x1`` projection to
    ``out_dim``, then trilinear interpolation onto the input grid (whatever depth the spacing rule
    kept, so 2D, isotropic and anisotropic inputs share the weights).

    Shapes: ``forward(x (B, C, Z, Y, X), skips 4 x (B, E, gz, gy, gx), level) -> (B, out_dim, Z, Y, X)``.
    """

    def __init__(self, in_chans: int, encoder_dim: int, feature_size: int, out_dim: int, out_level: int = 2):
        super().__init__()
        if not 0 <= out_level <= 3:
            raise SpadkitError(f"out_level must lie in 0..3, got {out_level}", fix="use 0 (full resolution) to 3 (1/8).")
        f = feature_size
        self.encoder0 = SpadResBlock(in_chans, f, level=0) if out_level == 0 else None
        self.encoders = nn.ModuleList(TokenUp(encoder_dim, 2**i * f, steps=4 - i) for i in range(3, max(out_level, 1) - 1, -1))
        widths = [encoder_dim, 8 * f, 4 * f, 2 * f, f][: 5 - out_level]
        self.decoders = nn.ModuleList(UpBlock(a, b, level=4 - i) for i, (a, b) in enumerate(itertools.pairwise(widths)))
        self.proj = nn.Conv3d(widths[-1], out_dim, 1)

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor], level: int) -> torch.Tensor:
        encoded = [up(z, level) for up, z in zip(self.encoders, reversed(skips[:3]))]  # levels 3, 2, 1
        if self.encoder0 is not None:
            encoded.append(self.encoder0(x, level))
        out = skips[3]
        for decoder, skip in zip(self.decoders, encoded):
            out = decoder(out, skip, level)
        out = self.proj(out)
        return out if out.shape[2:] == x.shape[2:] else F.interpolate(out, size=x.shape[2:], mode="trilinear", align_corners=False)


class SemanticDecoder(nn.Module):
    """Learnable queries cross-attending to image tokens (pre-norm ``nn.TransformerDecoder``).

    Shapes: ``forward(tokens (B, N, E)) -> (B, num_queries, dim)``.
    """

    def __init__(self, encoder_dim: int, num_queries: int, dim: int, depth: int, num_heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(1, num_queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.memory = nn.Sequential(nn.Linear(encoder_dim, dim), nn.LayerNorm(dim))
        layer = nn.TransformerDecoderLayer(dim, num_heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(len(tokens), -1, -1).to(tokens.dtype)
        return self.layers(queries, self.memory(tokens))


class UniMedDecoder(nn.Module):
    """UniMed's decomposed decoder (see the module docstring) on a backbone's skip maps.

    Args:
        in_chans: image channels (the pixel decoder's stem reads the image itself).
        encoder_dim: width of the backbone's tokens.
        num_classes: class queries ``K``, background (class 0) included.
        extra_queries: queries without a class (context for the class queries; never supervised).
        feature_size: UNETR channels at full resolution of the pixel decoder.
        pixel_level: in-plane level the pixel decoder stops at before interpolating onto the
            input grid (0: full resolution; 2: a quarter, Mask2Former's mask resolution).
        mask_dim: width ``E`` of the pixel and mask embeddings.
        dim, depth, num_heads: the semantic decoder.

    Shapes: ``forward(x (B, C, Z, Y, X), skips 4 x (B, encoder_dim, gz, gy, gx), level)``; the
    output's ``Q = num_classes + extra_queries``, the class queries first.
    """

    def __init__(
        self,
        in_chans: int,
        encoder_dim: int,
        num_classes: int,
        extra_queries: int = 0,
        feature_size: int = 16,
        pixel_level: int = 2,
        mask_dim: int = 32,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
    ):
        super().__init__()
        if num_classes < 2 or extra_queries < 0:
            raise SpadkitError(
                f"UniMed needs num_classes >= 2 and extra_queries >= 0, got {num_classes} and {extra_queries}",
                fix="count the background as a class: num_classes=2 for one structure.",
            )
        self.num_classes, self.extra_queries = num_classes, extra_queries
        self.pixel = PixelDecoder(in_chans, encoder_dim, feature_size, mask_dim, pixel_level)
        self.semantic = SemanticDecoder(encoder_dim, num_classes + extra_queries, dim, depth, num_heads)
        self.presence = nn.Linear(dim, 1)
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, mask_dim))

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor], level: int) -> UniMedOutput:
        pixels = self.pixel(x, skips, level)
        queries = self.semantic(skips[3].flatten(2).transpose(1, 2))
        masks = torch.einsum("bqe,bezyx->bqzyx", self.mask_embed(queries), pixels)
        return UniMedOutput(self.presence(queries)[..., 0], masks, pixels, queries)


class UniMedNet(nn.Module):
    """SPAD-ViT backbone with UniMed's decomposed decoder.

    Args:
        backbone: the encoder (its ``in_chans`` is the model's).
        kwargs: :class:`UniMedDecoder`'s arguments after ``encoder_dim``.
    """

    def __init__(self, backbone: SpadViT, num_classes: int = 2, **kwargs: Any):
        super().__init__()
        self.backbone = backbone
        self.in_chans, self.num_classes = backbone.in_chans, num_classes
        self.skip_indices = skip_indices(len(backbone.blocks))
        self.decoder = UniMedDecoder(backbone.in_chans, backbone.embed_dim, num_classes, **kwargs)

    def forward(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float], level: int | torch.Tensor | None = None) -> UniMedOutput:
        check_channels(self, x)
        level = resolve_level(level, spacing, x.shape[2])
        skips = self.backbone.forward_intermediates(x, spacing, self.skip_indices, norm=True, level=level)
        return self.decoder(x, skips, level)


def class_probabilities(out: UniMedOutput, num_classes: int) -> torch.Tensor:
    """``(B, K, Z, Y, X)`` per-voxel class probabilities from the class queries (Mask2Former's
    semantic inference: ``sigmoid(presence) * sigmoid(mask)``, normalised over the classes)."""
    scores = out.presence[:, :num_classes, None, None, None].sigmoid() * out.masks[:, :num_classes].sigmoid()
    return scores / scores.sum(1, keepdim=True).clamp_min(1e-6)


# ---------------------------------------------------------------------- composed targets
class Bag(NamedTuple):
    """"At least one voxel inside is class ``label``": sample ``sample``, voxels ``region`` (z, y, x slices)."""

    sample: int
    label: int
    region: tuple[slice, slice, slice]


class ComposedTargets(NamedTuple):
    """The composed decoder's common discrete target of a batch (entries -1 unknown, 0, 1).

    Attributes:
        presence: ``(B, K)`` int8, class ``k`` appears in the patch.
        voxels: ``(B, K, Z, Y, X)`` int8, the voxel is class ``k``.
        bags: the multiple-instance constraints of the boxes.
    """

    presence: torch.Tensor
    voxels: torch.Tensor
    bags: list[Bag]


def box_region(box: torch.Tensor, shape: Sequence[int]) -> tuple[slice, slice, slice] | None:
    """Voxel slices covered by a half-open box ``(z0, y0, x0, z1, y1, x1)`` (patch voxels; outward
    rounding, clipped to ``shape``); ``None`` when nothing of it lies inside."""
    lo = [max(0, math.floor(float(v))) for v in box[:3]]
    hi = [min(n, math.ceil(float(v))) for v, n in zip(box[3:], shape)]
    return None if any(b <= a for a, b in zip(lo, hi)) else tuple(slice(a, b) for a, b in zip(lo, hi))


def compose_targets(batch: Mapping[str, Any], num_classes: int) -> ComposedTargets:
    """The composed targets of a :class:`~spadkit.data.PatchStream` batch (``joint_classes=K``).

    Reads ``label``/``annotated`` ``(B, 1, Z, Y, X)``, ``boxes`` (B tensors ``(n, 7)``: class,
    z0, y0, x0, z1, y1, x1), ``box_known`` ``(B, K)`` bool and ``image_classes`` ``(B, K)`` int8;
    a missing key counts as unknown for every sample. Foreground classes ``k >= 1``:

    * mask: known where annotated (``1`` where ``label == k``, else ``0``);
    * box: a bag per box; where ``box_known[k]``, voxels outside every box of ``k`` are ``0``;
    * image class absent: ``0`` everywhere (present in the case: nothing known in the patch);
    * none: everything unknown.

    Mask voxels win over the other levels where they disagree. Background (class 0) is derived:
    ``1`` where every foreground class is known ``0``, ``0`` where one is known ``1``. Presence in
    the patch is ``1`` where a voxel is known ``1`` or a box of ``k`` reaches the patch, ``0`` where
    every voxel is known ``0``, else unknown.
    """
    image = batch["image"]
    b, shape = image.shape[0], tuple(image.shape[2:])
    voxels = torch.full((b, num_classes, *shape), UNKNOWN, dtype=torch.int8, device=image.device)
    fg = voxels[:, 1:]
    classes = batch.get("image_classes")
    if classes is not None:
        fg[(classes[:, 1:num_classes] == ABSENT).to(image.device)] = ABSENT
    bags: list[Bag] = []
    boxes, box_known = batch.get("boxes"), batch.get("box_known")
    for i in range(b) if boxes is not None else ():
        inside = torch.zeros((num_classes, *shape), dtype=torch.bool, device=image.device)
        for row in boxes[i]:
            label, region = int(row[0]), box_region(row[1:], shape)
            if region is not None and 1 <= label < num_classes:
                bags.append(Bag(i, label, region))
                inside[(label, *region)] = True
        if box_known is not None:
            for k in torch.nonzero(box_known[i, 1:num_classes]).flatten().tolist():
                fg[i, k][~inside[k + 1]] = ABSENT
    if "annotated" in batch:
        annotated = batch["annotated"][:, 0].bool()
        onehot = batch["label"][:, 0, None] == torch.arange(1, num_classes, device=image.device)[:, None, None, None]
        fg.copy_(torch.where(annotated[:, None], onehot.to(torch.int8), fg))
    voxels[:, 0] = torch.where((fg == ABSENT).all(1), PRESENT, torch.where((fg == PRESENT).any(1), ABSENT, UNKNOWN))
    flat = voxels.flatten(2)
    presence = torch.where((flat == PRESENT).any(-1), PRESENT, torch.where((flat == ABSENT).all(-1), ABSENT, UNKNOWN)).to(torch.int8)
    for bag in bags:
        presence[bag.sample, bag.label] = PRESENT
    return ComposedTargets(presence, voxels, bags)


# ---------------------------------------------------------------------- variants
#: UniMed decoder sizes per backbone (the semantic decoder's width, depth and heads; the mask embedding).
DECODER_SIZES = {
    "spad_vit_test": {"dim": 32, "depth": 1, "num_heads": 2, "mask_dim": 16},
    "spad_vit_small": {"dim": 128, "depth": 2, "num_heads": 4, "mask_dim": 32},
    "spad_vit_base": {"dim": 256, "depth": 3, "num_heads": 8, "mask_dim": 64},
}


def decoder_args(vit: str, **overrides: Any) -> dict[str, Any]:
    """:class:`UniMedDecoder` sizes for the registered ViT ``vit`` (:data:`DECODER_SIZES`, UNETR's
    ``feature_size``), with ``overrides`` (``None`` values ignored).

    Raises:
        SpadkitError: ``vit`` has no UniMed sizes.
    """
    if vit not in DECODER_SIZES:
        raise SpadkitError(f"no UniMed decoder sizes for the backbone {vit!r}", fix=f"use one of {', '.join(DECODER_SIZES)}.")
    return {"feature_size": FEATURE_SIZES[vit], **DECODER_SIZES[vit], **{k: v for k, v in overrides.items() if v is not None}}


def _register(name: str, vit: str) -> None:
    def build(num_classes: int = 2, in_chans: int = 1, backbone: str | os.PathLike | None = None, extra_queries: int = 0, feature_size: int | None = None, mask_dim: int | None = None, pixel_level: int = 2, **kwargs: Any) -> UniMedNet:
        encoder = load_backbone(vit, backbone, in_chans, **kwargs)
        return UniMedNet(encoder, num_classes, extra_queries=extra_queries, pixel_level=pixel_level, **decoder_args(vit, feature_size=feature_size, mask_dim=mask_dim))

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"UniMed decoders on ``{vit}``; ``backbone``: a pretrained ViT folder (``save_pretrained`` output)."
    register_model(build)


for _size in ("test", "small", "base"):
    _register(f"unimed_{_size}", f"spad_vit_{_size}")
