"""Training the SPAD-VT tokenizer as a LightningModule (PUMIT's tokenizer recipe).

Generator losses come from :func:`spadkit.models.tokenizer.tokenizer_losses`
(L1 on [-1, 1], codebook usage over the global batch, per-token entropy,
optional perceptual). A :class:`~spadkit.models.PatchDiscriminator` of PUMIT's
size is trained every step with the hinge loss; its adversarial term (PUMIT's
weight 3e-3) enters the generator loss only while the discriminator is good:
``max(EMA of its loss, its last loss) <= gan_threshold`` (PUMIT's gate, EMA
momentum 0.9 from 0.1), not from a fixed step.

Diagnostics (:mod:`spadkit.tasks.diagnostics`) are logged every
``diagnostics_every`` steps: reconstruction PSNR beside the patch-mean
baseline's, the share of codes in use, and the mutual information between code
and content given the token position over recent batches. The exported
:class:`~spadkit.models.PretrainedCfg` records them (``provenance["diagnostics"]``);
:class:`~spadkit.tasks.MIMPretrain` refuses a tokenizer that does not beat the
patch-mean baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from spadkit.models import PatchDiscriminator, create_model, save_pretrained
from spadkit.models.tokenizer import hinge_losses, tokenizer_losses
from spadkit.tasks.diagnostics import TokenizerProbe
from spadkit.tasks.pretrain import (
    adamw_with_cosine,
    full_submodule_state,
    level_on_host,
    pretrained_cfg,
)


class TokenizerPretrain(L.LightningModule):
    """Train a registered tokenizer (``spad_vt_test`` or ``spad_vt``).

    Args:
        tokenizer: registered tokenizer name.
        in_chans: image channels.
        usage_weight, entropy_weight: weights of ``-H(mean p)`` and ``mean H(p)`` (see
            :func:`~spadkit.models.tokenizer.tokenizer_losses` for the choice of defaults).
        usage_warmup_steps: train on reconstruction only (usage and entropy weights 0)
            for this many steps first.
        gan_weight: weight of the generator's adversarial term (PUMIT: 3e-3; 0: no discriminator).
        gan_threshold: the adversarial term is on while ``max(EMA, last)`` of the
            discriminator loss is at most this (PUMIT: 0.025).
        disc_channels, disc_post_convs: discriminator size (PUMIT: (128, 256, 512), 1).
        perceptual: a module ``(prediction, target) -> loss`` on 2D slices ``(N, C, Y, X)``
            in [-1, 1], e.g. LPIPS (PUMIT, weight 1); ``None``: no perceptual term.
        perceptual_weight, max_perceptual_slices: its weight and slices per sample.
        lr, disc_lr, weight_decay, warmup_steps: optimisation (AdamW, warm-up, cosine; PUMIT's
            lr 1e-4 and 1e-3, weight decay 0.05, AdamW's default betas).
        diagnostics_every: steps between diagnostics (over a window of 20 of them).
        export_dir: where ``on_train_end`` writes the tokenizer with its :class:`PretrainedCfg`.
    """

    def __init__(
        self,
        tokenizer: str = "spad_vt_test",
        in_chans: int = 1,
        usage_weight: float = 1.0,
        entropy_weight: float = 0.2,
        usage_warmup_steps: int = 0,
        gan_weight: float = 3e-3,
        gan_threshold: float = 0.025,
        disc_channels: Sequence[int] = (128, 256, 512),
        disc_post_convs: int = 1,
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        max_perceptual_slices: int = 24,
        lr: float = 1e-4,
        disc_lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        diagnostics_every: int = 10,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["perceptual"])
        self.automatic_optimization = False
        self.tokenizer = create_model(tokenizer, in_chans=in_chans)
        self.discriminator = PatchDiscriminator(in_chans, disc_channels, disc_post_convs) if gan_weight > 0 else None
        self.perceptual = perceptual
        if perceptual is not None:
            perceptual.requires_grad_(False)
        self.register_buffer("disc_loss_ema", torch.tensor(0.1))
        self.register_buffer("disc_loss_last", torch.tensor(float("inf")))
        self.probe = TokenizerProbe()

    @property
    def gan_active(self) -> bool:
        """PUMIT's gate: both the EMA and the last discriminator loss at most ``gan_threshold``."""
        return self.discriminator is not None and max(float(self.disc_loss_ema), float(self.disc_loss_last)) <= self.hparams.gan_threshold

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return level_on_host(batch)

    def losses(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Generator losses, the reconstruction and the code logits of a batch."""
        x, spacing = batch["image"], batch["spacing"]
        level = batch.get("level")
        recon, logits = self.tokenizer(x, spacing, level)
        hp = self.hparams
        warm = self._trainer is not None and self.trainer.training and self._batches_seen() < hp.usage_warmup_steps
        gather = self.all_gather if self._trainer is not None and self.trainer.world_size > 1 else None
        losses = tokenizer_losses(
            x,
            recon,
            logits,
            usage_weight=0.0 if warm else hp.usage_weight,
            entropy_weight=0.0 if warm else hp.entropy_weight,
            perceptual=self.perceptual,
            perceptual_weight=hp.perceptual_weight,
            max_perceptual_slices=hp.max_perceptual_slices,
            gather=gather,
        )
        if self.gan_active:
            losses["gan"] = -self.discriminator(recon, spacing, level).mean()
            losses["loss"] = losses["loss"] + hp.gan_weight * losses["gan"]
        return losses, recon, logits

    def _batches_seen(self) -> int:
        return self.global_step // (1 if self.discriminator is None else 2)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        optimizers = self.optimizers()
        opt_g, opt_d = (optimizers, None) if self.discriminator is None else optimizers
        sched_g = self.lr_schedulers()
        losses, recon, logits = self.losses(batch)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(losses["loss"])
        opt_g.step()
        sched_g.step()
        if opt_d is not None:
            spacing, level = batch["spacing"], batch.get("level")
            disc_loss = hinge_losses(self.discriminator(batch["image"], spacing, level), self.discriminator(recon.detach(), spacing, level))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(disc_loss)
            opt_d.step()
            mean_loss = self.all_gather(disc_loss.detach()).mean()  # every rank takes the same gate decision
            self.disc_loss_last.copy_(mean_loss)
            self.disc_loss_ema.mul_(0.9).add_(0.1 * mean_loss)
            losses["disc"] = disc_loss
            losses["gan_on"] = torch.tensor(float(self.gan_active))
        if (self._batches_seen() - 1) % self.hparams.diagnostics_every == 0:
            batch_stats = self.probe.add(batch["image"], recon.detach(), logits.detach())
            losses.update({k: torch.tensor(float(v)) for k, v in {**batch_stats, **self.probe.summary()}.items()})
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=False, batch_size=len(batch["image"]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses, recon, logits = self.losses(batch)
        losses.update({k: torch.tensor(float(v)) for k, v in TokenizerProbe().add(batch["image"], recon, logits).items()})
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=len(batch["image"]), sync_dist=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        steps = 1 if self.discriminator is None else 2
        generator = adamw_with_cosine(
            self, hp.lr, hp.weight_decay, hp.warmup_steps, params=self.tokenizer.named_parameters(), optimizers_per_step=steps, betas=(0.9, 0.999)
        )
        if self.discriminator is None:
            return generator
        disc = torch.optim.AdamW(self.discriminator.parameters(), lr=hp.disc_lr, weight_decay=hp.weight_decay)
        return [generator["optimizer"], disc], [generator["lr_scheduler"]]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The perceptual network is fixed and passed in again: keep it out of checkpoints (PUMIT does too)."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("perceptual.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.perceptual is not None:
            checkpoint["state_dict"].update(self.perceptual.state_dict(prefix="perceptual."))

    def on_train_end(self) -> None:
        """Export the tokenizer (gathered from every rank first, so FSDP exports full weights)."""
        if not self.hparams.export_dir:
            return
        state = full_submodule_state(self, "tokenizer")
        if state is not None:
            cfg = pretrained_cfg(self, self.hparams.tokenizer, "tokenizer")
            cfg.provenance["diagnostics"] = {"window": f"last {len(self.probe.samples)} diagnosed training batches", **self.probe.summary()}
            save_pretrained(self.tokenizer, cfg, self.hparams.export_dir, state_dict=state)
