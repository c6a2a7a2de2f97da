"""Image classification on SPAD-ViT: pooled tokens, then a linear probe or an MLP.

``reset_classifier(num_classes)`` and ``get_classifier()`` behave as in timm,
so a pretrained classifier can be re-targeted to a new label set in one call.
A *linear probe* is ``head="linear"`` with a frozen backbone (see
:func:`spadkit.tasks.finetune.apply_freeze`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from spadkit.errors import SpadkitError
from spadkit.models.registry import register_model
from spadkit.models.unetr import check_channels, load_backbone
from spadkit.models.vit import SpadViT

POOLS = ("avg", "token", "avgtoken")
HEADS = ("linear", "mlp")


class SpadClassifier(nn.Module):
    """``forward(x (B, C, Z, Y, X), spacing) -> (B, num_classes)`` logits.

    Args:
        backbone: the encoder.
        num_classes: classes (0: :meth:`forward` returns pooled features).
        pool: ``"avg"`` (mean of patch tokens), ``"token"`` (the cls token) or
            ``"avgtoken"`` (both, concatenated).
        head: ``"linear"`` or ``"mlp"`` (LayerNorm, Linear, GELU, dropout, Linear).
        hidden: MLP width (default: the embedding size).
        drop: dropout before the last layer.
    """

    def __init__(self, backbone: SpadViT, num_classes: int = 2, pool: str = "avg", head: str = "linear", hidden: int | None = None, drop: float = 0.0):
        super().__init__()
        if pool not in POOLS or head not in HEADS:
            raise SpadkitError(f"unknown pool {pool!r} or head {head!r}", fix=f"pool is one of {POOLS}, head one of {HEADS}.")
        self.backbone = backbone
        self.in_chans = backbone.in_chans
        self.pool, self.head_type, self.hidden, self.drop = pool, head, hidden or backbone.embed_dim, drop
        self.num_features = backbone.embed_dim * (2 if pool == "avgtoken" else 1)
        self.reset_classifier(num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, pool: str | None = None) -> None:
        """A freshly initialised head for ``num_classes`` classes (0: identity), optionally a new pooling."""
        if pool is not None:
            if pool not in POOLS:
                raise SpadkitError(f"unknown pool {pool!r}", fix=f"pool is one of {POOLS}.")
            self.pool = pool
            self.num_features = self.backbone.embed_dim * (2 if pool == "avgtoken" else 1)
        self.num_classes = num_classes
        if num_classes == 0:
            self.head = nn.Identity()
        elif self.head_type == "linear":
            self.head = nn.Linear(self.num_features, num_classes)
        else:
            self.head = nn.Sequential(
                nn.LayerNorm(self.num_features), nn.Linear(self.num_features, self.hidden), nn.GELU(), nn.Dropout(self.drop), nn.Linear(self.hidden, num_classes)
            )
        device = self.backbone.cls_token.device
        self.head.to(device)

    def forward_features(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """``(B, 1 + N, C)`` normalised tokens."""
        check_channels(self, x)
        return self.backbone.forward_features(x, spacing)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool ``(B, 1 + N, C)`` tokens to ``(B, num_features)``, then classify unless ``pre_logits``."""
        prefix = self.backbone.num_prefix_tokens
        avg, cls = features[:, prefix:].mean(dim=1), features[:, 0]
        pooled = {"avg": avg, "token": cls}.get(self.pool)
        if pooled is None:
            pooled = torch.cat([avg, cls], dim=1)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float]) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, spacing))


def _register(name: str, vit: str) -> None:
    def build(
        num_classes: int = 2,
        in_chans: int = 1,
        backbone: str | os.PathLike | None = None,
        pool: str = "avg",
        head: str = "linear",
        hidden: int | None = None,
        drop: float = 0.0,
        **kwargs: Any,
    ) -> SpadClassifier:
        return SpadClassifier(load_backbone(vit, backbone, in_chans, **kwargs), num_classes, pool, head, hidden, drop)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"Classifier on ``{vit}``; ``backbone``: a pretrained ViT folder (``save_pretrained`` output)."
    register_model(build)


for _size in ("test", "small", "base"):
    _register(f"spad_cls_{_size}", f"spad_vit_{_size}")
