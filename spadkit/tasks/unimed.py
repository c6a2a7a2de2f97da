"""UniMed's one-stage joint learning (arXiv 2409.19890) over SPAD-ViT: MAE on every sample plus one
composed supervised loss on whatever annotation each sample has.

:func:`composed_loss` supervises the decomposed decoder's outputs
(:class:`~spadkit.models.unimed.UniMedOutput`) against the composed targets
(:func:`~spadkit.models.unimed.compose_targets`), only where they are known:

* ``presence``: binary cross-entropy of each class query's presence logit, on known entries;
* ``voxel_bce`` + ``voxel_dice``: binary cross-entropy on known voxels, and MONAI's Dice
  (sigmoid) per sample and class on its known voxels, for the pairs with a known positive voxel
  (absent classes are left to the cross-entropy: a Dice of an empty target only pushes to zero);
* ``bags``: multiple-instance learning for boxes: the largest mask logit of class ``c`` inside a
  box of ``c`` is pushed up (binary cross-entropy of that maximum against 1).

Every term is a mean over its known entries, so a sample without labels changes neither the
loss nor any gradient: it is trained by the self-supervised loss only.

:class:`UniMedPretrain` is the LightningModule: per step MAE (:class:`~spadkit.tasks.MAEPretrain`,
the encoder on the visible 25 % of the tokens) on every sample, plus a second, unmasked forward of
the backbone through UniMed's decoders for the composed loss. It keeps no queue or memory bank:
its state is the weights alone, of fixed size. Only the backbone is exported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from spadkit.errors import SpadkitError
from spadkit.models import PretrainedCfg
from spadkit.models.unetr import skip_indices
from spadkit.models.unimed import (
    PRESENT,
    ComposedTargets,
    UniMedDecoder,
    UniMedOutput,
    compose_targets,
    decoder_args,
)
from spadkit.models.vit import resolve_level
from spadkit.tasks.mae import MAEPretrain
from spadkit.tasks.pretrain import pretrained_cfg

#: Logit that hides an unknown voxel from the Dice loss (its sigmoid is 0, as is its target there).
_HIDDEN = -1e4


def _mean_or_zero(values: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``values.mean()``, or a zero that keeps ``anchor``'s graph when there are none (so every
    parameter still gets a gradient, as DDP requires)."""
    return values.mean() if values.numel() else anchor.sum() * 0.0


def composed_loss(
    out: UniMedOutput,
    targets: ComposedTargets,
    presence_weight: float = 1.0,
    voxel_weight: float = 1.0,
    bag_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The composed supervised loss of one batch (see the module docstring).

    Args:
        out: the decoder's outputs; its first ``K`` queries are the class queries.
        targets: :func:`~spadkit.models.unimed.compose_targets` of the batch (``K`` classes).
        presence_weight, voxel_weight, bag_weight: weights of the presence, voxel (cross-entropy +
            Dice) and box-bag terms in ``supervised``.

    Returns:
        ``presence``, ``voxel_bce``, ``voxel_dice``, ``bags`` and their weighted sum ``supervised``.
    """
    k = targets.presence.shape[1]
    presence_logits, masks = out.presence[:, :k], out.masks[:, :k]
    known = targets.presence >= 0
    presence = _mean_or_zero(F.binary_cross_entropy_with_logits(presence_logits[known], (targets.presence[known] == PRESENT).to(presence_logits.dtype), reduction="none"), presence_logits)
    known_voxels = targets.voxels >= 0
    target = (targets.voxels == PRESENT).to(masks.dtype)
    voxel_bce = _mean_or_zero(F.binary_cross_entropy_with_logits(masks[known_voxels], target[known_voxels], reduction="none"), masks)
    positive = (targets.voxels == PRESENT).flatten(2).any(-1)  # (B, K): the pairs Dice is taken on
    dice = DiceLoss(sigmoid=True, reduction="none")(masks.masked_fill(~known_voxels, _HIDDEN), target)
    voxel_dice = _mean_or_zero(dice.flatten(1)[positive], masks)
    bag_logits = torch.stack([masks[(bag.sample, bag.label, *bag.region)].max() for bag in targets.bags]) if targets.bags else masks.new_zeros(0)
    bags = _mean_or_zero(F.softplus(-bag_logits), masks)  # = BCE(max logit, 1)
    supervised = presence_weight * presence + voxel_weight * (voxel_bce + voxel_dice) + bag_weight * bags
    return {"presence": presence, "voxel_bce": voxel_bce, "voxel_dice": voxel_dice, "bags": bags, "supervised": supervised}


class UniMedPretrain(MAEPretrain):
    """One-stage joint pretraining of a registered SPAD-ViT: MAE on every sample plus UniMed's
    composed supervised loss on what each sample has (see the module docstring).

    Batches come from ``PatchStream(joint_classes=num_classes)`` (``label``/``annotated``,
    ``boxes``, ``box_known``, ``image_classes``; missing keys count as unknown).

    Args:
        backbone, in_chans, mask_ratio, decoder_dim, decoder_depth, decoder_heads: the MAE part
            (:class:`~spadkit.tasks.MAEPretrain`).
        num_classes: class queries ``K``, background included (the stream's ``joint_classes``).
        extra_queries: queries without a class.
        semantic_dim, semantic_depth, semantic_heads, mask_dim, feature_size: UniMed's decoder;
            ``None`` takes the backbone's default (:data:`~spadkit.models.unimed.DECODER_SIZES`).
        pixel_level: where the pixel decoder stops before interpolating onto the input grid
            (:class:`~spadkit.models.unimed.PixelDecoder`; 0 full resolution, 2 a quarter).
        mae_weight: weight of the MAE loss; presence_weight, voxel_weight, bag_weight: the
            composed loss's terms (:func:`composed_loss`).
        lr, weight_decay, warmup_steps, export_dir: as :class:`~spadkit.tasks.MAEPretrain`.
    """

    def __init__(
        self,
        backbone: str = "spad_vit_test",
        in_chans: int = 1,
        num_classes: int = 2,
        extra_queries: int = 0,
        mask_ratio: float = 0.75,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        semantic_dim: int | None = None,
        semantic_depth: int | None = None,
        semantic_heads: int | None = None,
        mask_dim: int | None = None,
        feature_size: int | None = None,
        pixel_level: int = 2,
        mae_weight: float = 1.0,
        presence_weight: float = 1.0,
        voxel_weight: float = 1.0,
        bag_weight: float = 1.0,
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        export_dir: str | None = None,
    ):
        super().__init__(backbone, in_chans, mask_ratio, decoder_dim, decoder_depth, decoder_heads, lr, weight_decay, warmup_steps, export_dir)
        self.save_hyperparameters()
        if min(mae_weight, presence_weight, voxel_weight, bag_weight) < 0:
            raise SpadkitError("UniMed's loss weights must be >= 0", fix="set mae_weight, presence_weight, voxel_weight and bag_weight to 0 or more (0 switches a term off).")
        sizes = decoder_args(backbone, dim=semantic_dim, depth=semantic_depth, num_heads=semantic_heads, mask_dim=mask_dim, feature_size=feature_size)
        self.unimed = UniMedDecoder(in_chans, self.backbone.embed_dim, num_classes, extra_queries, pixel_level=pixel_level, **sizes)
        self.skip_indices = skip_indices(len(self.backbone.blocks))

    def setup(self, stage: str) -> None:
        """Refuse a training stream whose ``joint_classes`` differs from ``num_classes``."""
        stream = getattr(self.trainer.datamodule, "train_stream", None) if stage == "fit" and self._trainer is not None else None
        joint = getattr(stream, "joint_classes", None)
        if joint is not None and joint != self.hparams.num_classes:
            raise SpadkitError(
                f"the stream delivers {joint} joint classes, the model has num_classes={self.hparams.num_classes} class queries",
                fix=f"set data.joint_classes and model.init_args.num_classes to the same K (classes including background), e.g. both {joint}.",
            )

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``mae`` on every sample, the composed terms on the known targets, their weighted sum ``loss``,
        ``mae_floor_zero`` and ``labelled`` (the share of samples with any annotation)."""
        hp = self.hparams
        mae = super().losses(batch)
        x, spacing = batch["image"], batch["spacing"]
        level = resolve_level(batch.get("level"), spacing, x.shape[2])
        skips = self.backbone.forward_intermediates(x, spacing, self.skip_indices, norm=True, level=level)
        targets = compose_targets(batch, hp.num_classes)
        supervised = composed_loss(self.unimed(x, skips, level), targets, hp.presence_weight, hp.voxel_weight, hp.bag_weight)
        labelled = (targets.presence >= 0).any(1).float().mean()
        loss = hp.mae_weight * mae["loss"] + supervised.pop("supervised")
        return {"loss": loss, "mae": mae["mae"], "mae_floor_zero": mae["mae_floor_zero"], **{k: v.detach() for k, v in supervised.items()}, "labelled": labelled}

    def export_cfg(self) -> PretrainedCfg:
        cfg = pretrained_cfg(self, self.hparams.backbone, "unimed (one-stage joint learning: MAE on every sample + composed supervision of mask, box and image-class labels)")
        cfg.provenance["recipe"] = "unimed"
        cfg.provenance["joint_classes"] = self.hparams.num_classes
        return cfg
