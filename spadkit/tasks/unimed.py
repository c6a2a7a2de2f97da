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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from spadkit.models.unimed import PRESENT, ComposedTargets, UniMedOutput

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
