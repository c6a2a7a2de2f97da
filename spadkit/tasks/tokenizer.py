"""Training the SPAD-VT tokenizer as a LightningModule.

Generator losses come from :func:`spadkit.models.tokenizer.tokenizer_losses`
(L1, codebook usage, per-token entropy, optional perceptual). With
``gan_weight > 0`` a :class:`~spadkit.models.PatchDiscriminator` is trained
every step with the hinge loss, and its adversarial term enters the generator
loss only while the discriminator is stable: the moving average of its loss
at most ``gan_threshold`` (PUMIT switches it on this way, not at a fixed step).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from spadkit.models import PatchDiscriminator, create_model, save_pretrained
from spadkit.models.tokenizer import hinge_losses, tokenizer_losses
from spadkit.tasks.pretrain import adamw_with_cosine, pretrained_cfg


class TokenizerPretrain(L.LightningModule):
    """Train a registered tokenizer (``spad_vt_test`` or ``spad_vt``).

    Args:
        tokenizer: registered tokenizer name.
        in_chans: image channels.
        usage_weight, entropy_weight: weights of ``-H(mean p)`` and ``mean H(p)`` (see
            :func:`~spadkit.models.tokenizer.tokenizer_losses` for the choice of defaults).
        gan_weight: weight of the generator's adversarial term (0: no discriminator).
        gan_threshold: the adversarial term is on while the discriminator loss's moving
            average is at most this.
        lr, disc_lr, weight_decay, warmup_steps: optimisation (AdamW, warm-up, cosine).
        export_dir: where ``on_train_end`` writes the tokenizer with its :class:`PretrainedCfg`.
    """

    def __init__(
        self,
        tokenizer: str = "spad_vt_test",
        in_chans: int = 1,
        usage_weight: float = 1.0,
        entropy_weight: float = 0.2,
        gan_weight: float = 0.0,
        gan_threshold: float = 0.025,
        lr: float = 1e-4,
        disc_lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.tokenizer = create_model(tokenizer, in_chans=in_chans)
        self.discriminator = PatchDiscriminator(in_chans) if gan_weight > 0 else None
        self.register_buffer("disc_loss_ema", torch.tensor(0.1))

    @property
    def gan_active(self) -> bool:
        return self.discriminator is not None and float(self.disc_loss_ema) <= self.hparams.gan_threshold

    def losses(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x, spacing = batch["image"], batch["spacing"]
        recon, logits = self.tokenizer(x, spacing)
        hp = self.hparams
        losses = tokenizer_losses(x, recon, logits, usage_weight=hp.usage_weight, entropy_weight=hp.entropy_weight)
        if self.gan_active:
            losses["gan"] = -self.discriminator(recon, spacing).mean()
            losses["loss"] = losses["loss"] + hp.gan_weight * losses["gan"]
        return losses, recon

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        optimizers = self.optimizers()
        opt_g, opt_d = (optimizers, None) if self.discriminator is None else optimizers
        sched_g = self.lr_schedulers()
        losses, recon = self.losses(batch)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(losses["loss"])
        opt_g.step()
        sched_g.step()
        if opt_d is not None:
            spacing = batch["spacing"]
            disc_loss = hinge_losses(self.discriminator(batch["image"], spacing), self.discriminator(recon.detach(), spacing))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(disc_loss)
            opt_d.step()
            self.disc_loss_ema.mul_(0.9).add_(0.1 * disc_loss.detach())
            losses["disc"] = disc_loss
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["image"]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses, _ = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=len(batch["image"]), sync_dist=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        steps = 1 if self.discriminator is None else 2
        generator = adamw_with_cosine(self, hp.lr, hp.weight_decay, hp.warmup_steps, params=self.tokenizer.named_parameters(), optimizers_per_step=steps)
        if self.discriminator is None:
            return generator
        disc = torch.optim.AdamW(self.discriminator.parameters(), lr=hp.disc_lr, weight_decay=hp.weight_decay, betas=(0.5, 0.9))
        return [generator["optimizer"], disc], [generator["lr_scheduler"]]

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            cfg = pretrained_cfg(self, self.hparams.tokenizer, "tokenizer")
            save_pretrained(self.tokenizer, cfg, self.hparams.export_dir)
