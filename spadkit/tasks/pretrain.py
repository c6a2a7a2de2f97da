"""Foundation-model pretraining of SPAD-ViT as a LightningModule.

Objectives (each on or off through its weight; a weight of 0 switches it off):

* ``mim_weight``: masked image modelling (PUMIT). A ``mask_ratio`` share of the
  tokens (55 %) is replaced by the mask token; for those, the model predicts the
  frozen tokenizer's code distribution, trained with soft cross-entropy.
* ``mae_weight``: pixel reconstruction of the masked patches with per-patch
  normalised targets (MAE's ``norm_pix_loss``; VISION-MAE). spadkit computes it
  on the same masked forward pass as MIM (SimMIM-style mask tokens) instead of
  a second encoder pass over visible tokens only.
* ``modality_weight``: a modality discriminator on the cls token behind a
  gradient-reversal layer, pushing features to be modality-invariant
  (Universal Model, arXiv 2010.06107). Patches whose modality is not in
  ``modalities`` are ignored.
* ``scale_weight``: a classifier of the crop's in-plane physical extent (bins
  with edges ``scale_edges_mm``).

Batches come from :class:`~spadkit.data.PatchDataModule` (``image``,
``spacing``, ``modality``), intensities already scaled to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

import spadkit
from spadkit.data.augment import batch_seed
from spadkit.models import (
    CodeHead,
    ModalityDiscriminator,
    PixelHead,
    PretrainedCfg,
    ScaleClassifier,
    create_model,
    load_pretrained,
    save_pretrained,
    scale_bin,
)
from spadkit.models.spad import batch_level
from spadkit.models.vit import token_grid


class MIMPretrain(L.LightningModule):
    """Pretrain a registered SPAD-ViT with MIM, MAE and the auxiliary heads.

    Args:
        backbone: registered ViT name (``spad_vit_test``, ``spad_vit_small``, ``spad_vit_base``).
        in_chans: image channels.
        tokenizer: folder of a trained tokenizer (``save_pretrained`` output of
            :class:`~spadkit.tasks.TokenizerPretrain`); required when ``mim_weight > 0``.
        mask_ratio: share of tokens masked per sample.
        mim_weight, mae_weight, modality_weight, scale_weight: objective weights.
        modalities: modality names the discriminator tells apart.
        scale_edges_mm: bin edges of the in-plane crop extent for the scale head.
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay.
        export_dir: where ``on_train_end`` writes the backbone with its :class:`PretrainedCfg`.
    """

    def __init__(
        self,
        backbone: str = "spad_vit_test",
        in_chans: int = 1,
        tokenizer: str | None = None,
        mask_ratio: float = 0.55,
        mim_weight: float = 1.0,
        mae_weight: float = 1.0,
        modality_weight: float = 0.0,
        scale_weight: float = 0.0,
        modalities: Sequence[str] = ("CT", "MR"),
        scale_edges_mm: Sequence[float] = (64.0, 128.0, 256.0),
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        if min(mim_weight, mae_weight, modality_weight, scale_weight) < 0 or not any((mim_weight, mae_weight, modality_weight, scale_weight)):
            raise ValueError("objective weights must be >= 0 and at least one positive")
        self.backbone = create_model(backbone, in_chans=in_chans)
        dim = self.backbone.embed_dim
        self.tokenizer = None
        if mim_weight > 0:
            if tokenizer is None:
                raise ValueError(
                    "masked image modelling needs a trained tokenizer. Fix: train one with "
                    "`spadkit pretrain fit -c spadkit/configs/tokenizer_tiny.yaml` and pass tokenizer=<its export_dir>, "
                    "or set mim_weight: 0 to pretrain with MAE only."
                )
            self.tokenizer = _frozen_tokenizer(tokenizer)
            self.code_head = CodeHead(dim, self.tokenizer.num_codes)
        self.pixel_head = PixelHead(dim, in_chans) if mae_weight > 0 else None
        self.modalities = list(modalities)
        self._modality_index = {m.upper(): i for i, m in enumerate(self.modalities)}  # names match case-insensitively
        self.modality_head = ModalityDiscriminator(dim, len(self.modalities)) if modality_weight > 0 else None
        self.register_buffer("scale_edges", torch.tensor(list(scale_edges_mm), dtype=torch.float32), persistent=False)
        self.scale_head = ScaleClassifier(dim, len(scale_edges_mm) + 1) if scale_weight > 0 else None

    def train(self, mode: bool = True) -> MIMPretrain:
        """Switch train/eval mode; the frozen tokenizer always stays in eval mode."""
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()
        return self

    def random_mask(self, batch_size: int, num_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, N)`` bool with exactly ``round(N * mask_ratio)`` (at least 1) masked tokens per sample.

        ``generator`` (CPU) makes the masks reproducible; :meth:`losses` seeds it from the
        batch (:func:`~spadkit.data.augment.batch_seed`), so validation masks are fixed,
        DDP ranks differ and a resumed run draws the same masks.
        """
        count = min(num_tokens, max(1, round(num_tokens * self.hparams.mask_ratio)))
        order = torch.rand(batch_size, num_tokens, generator=generator).argsort(dim=1)
        return (order < count).to(self.device)

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Every enabled objective's loss and ``loss``, their weighted sum."""
        x, spacing = batch["image"], batch["spacing"]
        level = batch_level(spacing, x.shape[2])
        grid = token_grid(x.shape[2:], level)
        generator = torch.Generator().manual_seed(batch_seed(0, batch))
        mask = self.random_mask(len(x), math.prod(grid), generator)
        features = self.backbone.forward_features(x, spacing, mask)
        tokens = features[:, self.backbone.num_prefix_tokens :]
        hp = self.hparams
        out: dict[str, torch.Tensor] = {}
        if self.tokenizer is not None:
            with torch.no_grad():
                target = self.tokenizer.encode(x, spacing).flatten(2).transpose(1, 2).softmax(-1)
            logits = self.code_head(tokens[mask])
            out["mim"] = -(target[mask] * logits.log_softmax(-1)).sum(-1).mean()
        if self.pixel_head is not None:
            recon = self.pixel_head(tokens, grid, level)
            pred, target_px = _patches(recon, grid), _patches(x, grid)
            target_px = (target_px - target_px.mean(-1, keepdim=True)) / (target_px.var(-1, keepdim=True) + 1e-6).sqrt()
            out["mae"] = F.mse_loss(pred[mask], target_px[mask])
        if self.modality_head is not None:
            labels = torch.tensor([self._modality_index.get((m or "").upper(), -100) for m in batch["modality"]], device=x.device)
            logits = self.modality_head(features[:, 0])
            out["modality"] = F.cross_entropy(logits, labels, ignore_index=-100) if (labels >= 0).any() else logits.sum() * 0
        if self.scale_head is not None:
            extent = (spacing[:, 1:] * torch.tensor(x.shape[3:], device=x.device)).amin(dim=1).float()
            out["scale"] = F.cross_entropy(self.scale_head(features[:, 0]), scale_bin(extent, self.scale_edges))
        weights = {"mim": hp.mim_weight, "mae": hp.mae_weight, "modality": hp.modality_weight, "scale": hp.scale_weight}
        out["loss"] = sum(weights[k] * v for k, v in out.items())
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=len(batch["image"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=len(batch["image"]), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_cosine(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_steps)

    def on_train_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            cfg = pretrained_cfg(self, self.hparams.backbone, "mim+mae+aux pretraining", modalities=self.modalities)
            save_pretrained(self.backbone, cfg, self.hparams.export_dir)


def _frozen_tokenizer(directory: str) -> torch.nn.Module:
    _, cfg = load_pretrained(directory)
    tokenizer = create_model(cfg.architecture, pretrained=directory, in_chans=cfg.in_chans)
    tokenizer.requires_grad_(False).eval()
    return tokenizer


def _patches(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """``(B, C, Z, Y, X)`` -> ``(B, N, C * dz * dy * dx)`` in token order."""
    b, c, z, y, xx = x.shape
    gz, gy, gx = grid
    x = x.reshape(b, c, gz, z // gz, gy, y // gy, gx, xx // gx)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, gz * gy * gx, -1)


def adamw_with_cosine(
    module: L.LightningModule, lr: float, weight_decay: float, warmup_steps: int, params=None, optimizers_per_step: int = 1
) -> dict[str, Any]:
    """AdamW (no decay on biases, norms and token/position embeddings), linear warm-up,
    cosine decay to 1 % over the trainer's estimated steps.

    ``optimizers_per_step``: with manual optimisation Lightning counts every optimiser's
    step towards ``max_steps``, so a GAN (two optimisers) trains ``max_steps / 2`` batches.
    """
    decay, no_decay = [], []
    for name, param in (params if params is not None else module.named_parameters()):
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.split(".")[-1] in {"cls_token", "mask_token", "pos_embed"} else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    total = 1000
    if module._trainer is not None:
        total = int(module.trainer.estimated_stepping_batches)
        if total == module.trainer.max_steps:  # bounded by max_steps, which counts every optimiser's step
            total //= optimizers_per_step
        total = max(1, total)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


INTENSITY_RULES = {
    "percentile": PretrainedCfg.intensity,
    "zscore": "zscore: subtract the case's mean intensity, divide by its standard deviation",
    "none": "none: raw intensities as float32",
}


def pretrained_cfg(module: L.LightningModule, architecture: str, objective: str, **fields: Any) -> PretrainedCfg:
    """The :class:`PretrainedCfg` of weights trained by ``module``, with the intensity rule
    and patch settings the DataModule actually used."""
    datamodule = module.trainer.datamodule if module._trainer is not None else None
    stream_args = getattr(datamodule, "stream_args", {})
    intensity = INTENSITY_RULES.get(stream_args.get("intensity", "percentile"), PretrainedCfg.intensity)
    return PretrainedCfg(architecture=architecture, in_chans=module.hparams.in_chans, intensity=intensity, provenance=provenance(module, objective), **fields)


def provenance(module: L.LightningModule, objective: str) -> dict[str, Any]:
    """What went into a set of weights: objective, steps, datasets, version, scalar hyperparameters."""
    datamodule = module.trainer.datamodule if module._trainer is not None else None
    sources = [str(getattr(s, "store", s)) for s in getattr(datamodule, "train_sources", [])]
    return {
        "objective": objective,
        "steps": int(module.global_step) // len(module.trainer.optimizers or [None]),
        "datasets": [Path(s).name for s in sources],
        "data": {k: repr(v) if not isinstance(v, (int, float, str, bool, type(None))) else v for k, v in getattr(datamodule, "stream_args", {}).items()},
        "spadkit_version": spadkit.__version__,
        "hparams": {k: v for k, v in module.hparams.items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
