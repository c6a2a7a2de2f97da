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

The auxiliary heads switch themselves off at ``setup`` when the training data
cannot pose their task (:mod:`spadkit.tasks.aux_tasks`); the reason is logged and
recorded in the exported :class:`~spadkit.models.PretrainedCfg`.

Floors logged beside the losses (:mod:`spadkit.tasks.diagnostics`): ``mim`` against
``mim_floor_entropy`` (the targets' own entropy, the least any predictor reaches) and
``mim_floor_position`` (a predictor that knows only each token's position); ``mae``
on textured tokens (``mae_textured``) against ``mae_floor_zero`` (predicting zero).
A MIM curve that stops at ``mim_floor_position`` learned position, not images.

Batches come from :class:`~spadkit.data.PatchDataModule` (``image``,
``spacing``, ``modality``, ``level``), intensities already scaled to [0, 1].
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

import spadkit
from spadkit.data.augment import batch_seed
from spadkit.errors import SpadkitError
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
from spadkit.models.vit import resolve_level, token_grid, token_patches
from spadkit.tasks.diagnostics import PositionPrior, soft_entropy, textured_tokens


class BackbonePretraining(L.LightningModule):
    """What :class:`MIMPretrain` and :class:`~spadkit.tasks.MAEPretrain` share: their ``losses(batch)``
    logged per step, AdamW with warm-up and cosine decay, the batch level kept on the host, and the
    export of ``self.backbone`` at the end of training (gathered from every rank first, so FSDP
    exports full weights). Subclasses define ``losses`` and :meth:`export_cfg`.
    """

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def export_cfg(self) -> PretrainedCfg:
        """The :class:`PretrainedCfg` written beside the exported backbone."""
        raise NotImplementedError

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return level_on_host(batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(batch["image"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=len(batch["image"]), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_cosine(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_steps)

    def on_train_end(self) -> None:
        if not self.hparams.export_dir:
            return
        state = full_submodule_state(self, "backbone")
        if state is not None:
            save_pretrained(self.backbone, self.export_cfg(), self.hparams.export_dir, state_dict=state)


class MIMPretrain(BackbonePretraining):
    """Pretrain a registered SPAD-ViT with MIM, MAE and the auxiliary heads.

    Args:
        backbone: registered ViT name (``spad_vit_test``, ``spad_vit_small``, ``spad_vit_base``).
        in_chans: image channels.
        tokenizer: folder of a trained tokenizer (``save_pretrained`` output of
            :class:`~spadkit.tasks.TokenizerPretrain`); required when ``mim_weight > 0``.
        check_tokenizer: refuse a tokenizer whose recorded reconstruction PSNR does not beat
            the patch-mean baseline (its codes then carry no image content).
        mask_ratio: share of tokens masked per sample.
        mim_weight, mae_weight, modality_weight, scale_weight: objective weights.
        modalities: modality names the discriminator tells apart.
        scale_edges_mm: bin edges of the in-plane crop extent for the scale head.
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay.
        export_dir: where ``on_train_end`` writes the backbone with its :class:`PretrainedCfg`.
        tokenizer_cfg: filled in automatically (the tokenizer's :class:`PretrainedCfg` as a
            dict), so a Lightning checkpoint, which holds the tokenizer's weights, loads after
            the tokenizer folder moved.
        recipe: label recorded as ``provenance["recipe"]`` of the export: ``"pumit"`` for
            ``pretrain_pumit.yaml``, else a spadkit variant.
    """

    def __init__(
        self,
        backbone: str = "spad_vit_test",
        in_chans: int = 1,
        tokenizer: str | None = None,
        check_tokenizer: bool = True,
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
        tokenizer_cfg: dict[str, Any] | None = None,
        recipe: str = "spadkit variant",
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
            self.tokenizer, cfg = _frozen_tokenizer(tokenizer, tokenizer_cfg)
            if check_tokenizer:
                check_tokenizer_content(cfg, tokenizer)
            self.hparams.tokenizer_cfg = dataclasses.asdict(cfg)
            self.code_head = CodeHead(dim, self.tokenizer.num_codes)
            self.position_prior = PositionPrior()
        self.pixel_head = PixelHead(dim, in_chans) if mae_weight > 0 else None
        self.modalities = list(modalities)
        self._modality_index = {m.upper(): i for i, m in enumerate(self.modalities)}  # names match case-insensitively
        self.modality_head = ModalityDiscriminator(dim, len(self.modalities)) if modality_weight > 0 else None
        self.register_buffer("scale_edges", torch.tensor(list(scale_edges_mm), dtype=torch.float32), persistent=False)
        self.scale_head = ScaleClassifier(dim, len(scale_edges_mm) + 1) if scale_weight > 0 else None
        self.heads_off: dict[str, str] = {}

    def train(self, mode: bool = True) -> MIMPretrain:
        """Switch train/eval mode; the frozen tokenizer always stays in eval mode."""
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()
        return self

    def setup(self, stage: str) -> None:
        """Switch off auxiliary heads whose task the training data cannot pose (before optimisers exist)."""
        stream = getattr(self.trainer.datamodule, "train_stream", None) if stage == "fit" and self._trainer is not None else None
        if stream is None:
            return
        from spadkit.tasks.aux_tasks import crop_extents_mm, modality_task_reason, scale_task_reason

        cases = [c for group in stream.cases for c in group]
        shapes = [s for group in stream.patch_shapes for s in group]
        size = stream.patch_size
        zoomed = getattr(size, "tokens", None) is not None and getattr(size, "zoom_prob", 0) > 0
        zoom = tuple(size.zoom) if zoomed else (1.0, 1.0)  # token-grid crops: the in-plane zoom range sets the extent
        reasons = {
            "scale": scale_task_reason(crop_extents_mm(cases, shapes, zoom), self.hparams.scale_edges_mm) if self.scale_head is not None else None,
            "modality": modality_task_reason(cases, self.modalities) if self.modality_head is not None else None,
        }
        for head, reason in reasons.items():
            if reason is not None:
                warnings.warn(reason, stacklevel=2)
                self.heads_off[head] = reason
                setattr(self, f"{head}_head", None)
                self.hparams[f"{head}_weight"] = 0.0  # the checkpoint then rebuilds the module without it

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
        """Every enabled objective's loss, ``loss`` (their weighted sum) and the floors beside them."""
        x, spacing = batch["image"], batch["spacing"]
        level = resolve_level(batch.get("level"), spacing, x.shape[2])
        grid = token_grid(x.shape[2:], level)
        generator = torch.Generator().manual_seed(batch_seed(0, batch))
        mask = self.random_mask(len(x), math.prod(grid), generator)
        features = self.backbone.forward_features(x, spacing, mask, level)
        tokens = features[:, self.backbone.num_prefix_tokens :]
        hp = self.hparams
        out: dict[str, torch.Tensor] = {}
        floors: dict[str, torch.Tensor] = {}
        if self.tokenizer is not None:
            with torch.no_grad():
                target = self.tokenizer.encode(x, spacing, level).flatten(2).transpose(1, 2).softmax(-1)
            logits = self.code_head(tokens[mask])
            out["mim"] = -(target[mask] * logits.log_softmax(-1)).sum(-1).mean()
            floors["mim_floor_entropy"] = soft_entropy(target[mask]).mean()
            position_floor = self.position_prior.cross_entropy(target, mask, grid, update=self.training)
            if position_floor is not None:
                floors["mim_floor_position"] = torch.tensor(position_floor)
        if self.pixel_head is not None:
            recon = self.pixel_head(tokens, grid, level)
            pred, target_px = token_patches(recon, grid), token_patches(x, grid)
            target_px = (target_px - target_px.mean(-1, keepdim=True)) / (target_px.var(-1, keepdim=True) + 1e-6).sqrt()
            out["mae"] = F.mse_loss(pred[mask], target_px[mask])
            textured = mask & textured_tokens(x, grid)
            if textured.any():
                floors["mae_textured"] = F.mse_loss(pred[textured], target_px[textured]).detach()
                floors["mae_floor_zero"] = target_px[textured].pow(2).mean()
        if self.modality_head is not None:
            labels = torch.tensor([self._modality_index.get((m or "").upper(), -100) for m in batch["modality"]], device=x.device)
            logits = self.modality_head(features[:, 0])
            out["modality"] = F.cross_entropy(logits, labels, ignore_index=-100) if (labels >= 0).any() else logits.sum() * 0
        if self.scale_head is not None:
            extent = (spacing[:, 1:] * torch.tensor(x.shape[3:], device=x.device)).amin(dim=1).float()
            out["scale"] = F.cross_entropy(self.scale_head(features[:, 0]), scale_bin(extent, self.scale_edges))
        weights = {"mim": hp.mim_weight, "mae": hp.mae_weight, "modality": hp.modality_weight, "scale": hp.scale_weight}
        out["loss"] = sum(weights[k] * v for k, v in out.items())
        return {**out, **floors}

    def export_cfg(self) -> PretrainedCfg:
        cfg = pretrained_cfg(self, self.hparams.backbone, "mim+mae+aux pretraining", modalities=self.modalities)
        cfg.provenance["heads_off"] = dict(self.heads_off)
        cfg.provenance["recipe"] = self.hparams.recipe
        return cfg


def full_submodule_state(module: L.LightningModule, name: str) -> dict[str, torch.Tensor] | None:
    """The full (gathered, unsharded) weights of ``module.<name>`` on global rank 0, ``None`` on the others.

    Reads them through the strategy (``lightning_module_state_dict``), which under FSDP gathers
    the shards: a collective, so every rank must call it (e.g. in ``on_train_end``). Under
    single-device and DDP training it is the plain state dict.
    """
    state = module.trainer.strategy.lightning_module_state_dict()
    if not module.trainer.is_global_zero:
        return None
    prefix = f"{name}."
    return {key.removeprefix(prefix): value.detach().cpu() for key, value in state.items() if key.startswith(prefix)}


def level_on_host(batch: dict[str, Any]) -> dict[str, Any]:
    """``on_before_batch_transfer``: the batch's ``level`` ``(B,)`` tensor becomes one int while
    still on the host, so no forward copies it back from the GPU."""
    level = batch.get("level") if isinstance(batch, dict) else None
    if isinstance(level, torch.Tensor):
        batch = {**batch, "level": resolve_level(level, batch["spacing"], batch["image"].shape[2])}
    return batch


def _frozen_tokenizer(directory: str, recorded: dict[str, Any] | None) -> tuple[torch.nn.Module, PretrainedCfg]:
    """The tokenizer of ``directory`` and its config; when the folder is gone but a checkpoint
    recorded its config, the bare architecture (its weights then come from the checkpoint)."""
    if recorded is not None and not Path(directory).is_dir():
        cfg = PretrainedCfg(**recorded)
        warnings.warn(f"tokenizer folder {directory} not found: rebuilding {cfg.architecture} from the checkpoint's record", stacklevel=3)
        tokenizer = create_model(cfg.architecture, in_chans=cfg.in_chans)
    else:
        _, cfg = load_pretrained(directory)
        tokenizer = create_model(cfg.architecture, pretrained=directory, in_chans=cfg.in_chans)
    tokenizer.requires_grad_(False).eval()
    return tokenizer, cfg


def check_tokenizer_content(cfg: PretrainedCfg, directory: str) -> None:
    """Raise unless the tokenizer's recorded diagnostics show it beats the patch-mean baseline.

    Raises:
        SpadkitError: no diagnostics recorded, or reconstruction PSNR at or below the baseline's.
    """
    diagnostics = cfg.provenance.get("diagnostics", {})
    skip = "pass check_tokenizer=False (--model.init_args.check_tokenizer=false) only for a tokenizer you have checked otherwise"
    if "psnr" not in diagnostics or "psnr_patch_mean" not in diagnostics:
        raise SpadkitError(
            "this tokenizer records no diagnostics, so nothing shows its codes carry image content",
            path=directory,
            fix=f"train it with spadkit.tasks.TokenizerPretrain (e.g. `spadkit pretrain --config tokenizer_tiny`), which records them; or {skip}.",
        )
    if not diagnostics["psnr"] > diagnostics["psnr_patch_mean"]:
        raise SpadkitError(
            f"this tokenizer reconstructs worse than each token's mean intensity (PSNR {diagnostics['psnr']:.2f} dB vs "
            f"{diagnostics['psnr_patch_mean']:.2f} dB for the patch-mean baseline): its codes carry too little image content "
            "for masked image modelling to learn from",
            path=directory,
            fix=f"train the tokenizer longer, on crops of many tokens (e.g. PatchSize(tokens=(5, 10, 10))), until train/psnr beats train/psnr_patch_mean; or {skip}.",
        )


def adamw_with_cosine(
    module: L.LightningModule,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    params=None,
    optimizers_per_step: int = 1,
    betas: tuple[float, float] = (0.9, 0.95),
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
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
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
