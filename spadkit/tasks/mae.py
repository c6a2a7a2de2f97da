"""``MAEPretrain``: masked autoencoding of SPAD-ViT with an encoder that sees only visible tokens.

VISION-MAE's objective (arXiv 2402.01034, after He et al. 2022): per sample a
``mask_ratio`` share of the tokens (75 %) is dropped before the encoder; a light
transformer decoder (:class:`~spadkit.models.mae.MAEDecoder`) reconstructs the
per-patch normalised voxels of the dropped tokens through the spacing-adaptive
unpatchify, so 2D images, isotropic and anisotropic volumes train one set of weights.
This differs from :class:`~spadkit.tasks.MIMPretrain`'s ``mae_weight`` term, which is
SimMIM-style (mask tokens inside the encoder, all tokens encoded).

Logged beside ``mae``: ``mae_floor_zero``, the loss of predicting zero on the same
tokens. Per-patch normalisation removes each patch's mean, so this is also the loss of
the patch-mean predictor; a run whose ``mae`` does not fall clearly below it learned
nothing about image content.
Only the encoder is exported (``save_pretrained``), as MAE does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from spadkit.data.augment import batch_seed
from spadkit.models import PretrainedCfg, create_model
from spadkit.models.mae import MAEDecoder, mae_loss, masked_positions, random_keep
from spadkit.models.vit import resolve_level, token_grid
from spadkit.tasks.pretrain import BackbonePretraining, pretrained_cfg


class MAEPretrain(BackbonePretraining):
    """Pretrain a registered SPAD-ViT as an MAE encoder.

    Args:
        backbone: registered ViT name (``spad_vit_test``, ``spad_vit_small``, ``spad_vit_base``).
        in_chans: image channels.
        mask_ratio: share of tokens dropped per sample (MAE's 0.75).
        decoder_dim, decoder_depth, decoder_heads: the light decoder.
        lr, weight_decay, warmup_steps: AdamW (betas 0.9/0.95) with linear warm-up then cosine decay.
        export_dir: where ``on_train_end`` writes the encoder with its :class:`PretrainedCfg`.
    """

    def __init__(
        self,
        backbone: str = "spad_vit_test",
        in_chans: int = 1,
        mask_ratio: float = 0.75,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        self.backbone = create_model(backbone, in_chans=in_chans)
        self.backbone.mask_token.requires_grad_(False)  # the SimMIM token: an MAE encoder never sees it (DDP refuses unused parameters)
        self.decoder = MAEDecoder(self.backbone.embed_dim, in_chans, decoder_dim, decoder_depth, decoder_heads)

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``mae`` (= ``loss``) and ``mae_floor_zero`` on one batch; the masks are seeded by the batch."""
        x, spacing = batch["image"], batch["spacing"]
        level = resolve_level(batch.get("level"), spacing, x.shape[2])
        grid = token_grid(x.shape[2:], level)
        num_tokens = math.prod(grid)
        generator = torch.Generator().manual_seed(batch_seed(0, batch))
        keep = random_keep(len(x), num_tokens, self.hparams.mask_ratio, generator, x.device)
        encoded, _ = self.backbone.forward_visible(x, spacing, keep, level)
        recon = self.decoder(encoded, keep, grid, level)
        masked = masked_positions(keep, num_tokens)
        loss = mae_loss(recon, x, grid, masked)
        with torch.no_grad():
            floor = mae_loss(torch.zeros_like(recon), x, grid, masked)
        return {"loss": loss, "mae": loss.detach(), "mae_floor_zero": floor}

    def export_cfg(self) -> PretrainedCfg:
        cfg = pretrained_cfg(self, self.hparams.backbone, "mae (VISION-MAE: encoder on visible tokens only)")
        cfg.provenance["recipe"] = "mae"
        return cfg
