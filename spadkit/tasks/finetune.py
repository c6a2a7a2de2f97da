"""Few-shot fine-tuning of SPAD-ViT models: segmentation (SPAD-UNETR) and classification.

Both tasks share

* **freezing schedules** (``freeze``): ``"head"`` trains everything but the backbone
  (the decoder or the classifier: a linear probe with ``head="linear"``),
  ``"last"`` also the last ``unfreeze_blocks`` transformer blocks and the final norm,
  ``"full"`` everything;
* **layer-wise learning-rate decay** (BEiT/MAE fine-tuning): block ``i`` of ``D`` trains
  at ``lr * layer_decay ** (D - i)``, the embeddings at ``layer_decay ** (D + 1)``, the
  decoder/head at ``lr``; no weight decay on biases, norms and tokens;
* AdamW with linear warm-up then cosine decay;
* checkpoints that do not depend on the pretraining folder: the backbone folder is read
  once at construction and dropped from the saved hyper-parameters, so
  ``load_from_checkpoint(path, weights_only=True)`` rebuilds from the checkpoint alone.

Batches: ``image`` ``(B, C, Z, Y, X)`` (normalised as in pretraining), ``spacing`` ``(B, 3)``
mm, ``label`` (``(B, 1, Z, Y, X)`` integer classes for segmentation, ``(B,)`` for
classification) and optionally ``annotated`` ``(B, 1, Z, Y, X)`` bool: the voxels a person
labelled. Unannotated voxels are *unknown*: the loss ignores them (never background).

Bad input fails before the first step, with the case and the fix: at construction a
checkpoint or pretrained backbone of another class count, channel count or architecture;
in ``setup`` (with a :class:`~spadkit.data.PatchDataModule`) a case whose channels differ
from ``in_chans``, annotated label values outside ``0..num_classes - 1``, and (from the
stream) a label version whose annotated mask is empty.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from monai.metrics import (
    ConfusionMatrixMetric,
    DiceMetric,
    HausdorffDistanceMetric,
    ROCAUCMetric,
    SurfaceDiceMetric,
)
from torch import nn

from spadkit.data.datamodule import PatchDataModule
from spadkit.errors import SpadkitError
from spadkit.models import PretrainedCfg, create_model, load_state_dict, save_pretrained

Freeze = Literal["head", "last", "full"]


def apply_freeze(model: nn.Module, freeze: Freeze = "full", unfreeze_blocks: int = 0) -> None:
    """Set ``requires_grad`` by a freezing schedule (see the module docstring) on a model with a ``backbone``."""
    if freeze not in ("head", "last", "full"):
        raise SpadkitError(f"unknown freeze schedule {freeze!r}", fix="use 'head', 'last' (with unfreeze_blocks=N) or 'full'.")
    model.requires_grad_(True)
    if freeze == "full":
        return
    backbone = model.backbone
    backbone.requires_grad_(False)
    if freeze == "last":
        if not 0 < unfreeze_blocks <= len(backbone.blocks):
            raise SpadkitError(f"unfreeze_blocks must lie in 1..{len(backbone.blocks)} for freeze='last', got {unfreeze_blocks}", fix="pick how many final blocks to train.")
        for block in backbone.blocks[len(backbone.blocks) - unfreeze_blocks :]:
            block.requires_grad_(True)
        backbone.norm.requires_grad_(True)


def layer_id(name: str, depth: int) -> int:
    """Depth index of a parameter for layer-wise decay: 0 embeddings, ``i + 1`` block ``i``, ``depth + 1`` the rest."""
    if not name.startswith("backbone."):
        return depth + 1
    rest = name[len("backbone.") :]
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    if rest.startswith(("patch_embed", "cls_token", "mask_token", "pos_embed")):
        return 0
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters with ``lr_scale`` (layer-wise decay) and weight decay
    (none on 1-D parameters and the backbone's tokens)."""
    depth = len(model.backbone.blocks)
    no_decay = {f"backbone.{n}" for n in model.backbone.no_weight_decay()}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid, decay = layer_id(name, depth), not (param.ndim <= 1 or name in no_decay)
        group = groups.setdefault((lid, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": layer_decay ** (depth + 1 - lid)})
        group["params"].append(param)
    return list(groups.values())


def load_weights(model: nn.Module, path: str | os.PathLike, *, load_head: bool = True) -> None:
    """Load fine-tuned weights into ``model``: ``save_pretrained``'s folder or its ``model.pt``, or a
    Lightning ``.ckpt`` (read with ``weights_only=True``).

    Raises:
        SpadkitError: the checkpoint is of another architecture, channel count (``in_chans``) or
            class count (``num_classes``); the message says which and how to fix it.
    """
    path = Path(path) / "model.pt" if Path(path).is_dir() else Path(path)
    state = load_state_dict(path)
    state = state.get("state_dict", state)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if not load_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = model.state_dict()
    differ = [k for k in own if k in state and state[k].shape != own[k].shape]
    body = [k for k in differ if not k.startswith("head.")]
    embed = "backbone.patch_embed.weight"
    if body and embed in body and all(_differ_in_channels(state[k].shape, own[k].shape) for k in body):
        theirs = state[embed].shape[1]
        raise SpadkitError(
            f"the checkpoint takes {theirs}-channel images, the model {own[embed].shape[1]}",
            path=path,
            fix=f"set in_chans={theirs} (and feed that many channels), or fine-tune from the pretrained backbone instead.",
        )
    missing, unexpected = [k for k in own if k not in state and not (k.startswith("head.") and not load_head)], [k for k in state if k not in own]
    if body or missing or unexpected:
        first = body[0] if body else (missing or unexpected)[0]
        shapes = f" ({tuple(state[first].shape)} there, {tuple(own[first].shape)} here)" if body else ""
        raise SpadkitError(
            f"the checkpoint is of another architecture: {len(body)} tensor(s) differ in shape, {len(missing)} are missing and "
            f"{len(unexpected)} unexpected, e.g. {first}{shapes}",
            path=path,
            fix="pass the checkpoint's own architecture as model=... (e.g. spad_unetr_small), or a checkpoint of this one.",
        )
    if differ:
        head = differ[0]
        raise SpadkitError(
            f"the checkpoint predicts {state[head].shape[0]} classes, the model is configured for {own[head].shape[0]}",
            path=path,
            fix=f"set num_classes={state[head].shape[0]} to use it as it is, or load_head=False to keep its features and train a new head.",
        )
    model.load_state_dict(state, strict=False)


def _differ_in_channels(theirs: torch.Size, ours: torch.Size) -> bool:
    """Two weight shapes that differ only in their input channels (dimension 1)."""
    return len(theirs) == len(ours) > 1 and theirs[0] == ours[0] and theirs[2:] == ours[2:]


class _Finetune(L.LightningModule):
    """Model construction, freezing, optimiser and checkpoint hygiene shared by both tasks."""

    def __init__(self, model: str, model_kwargs: Mapping[str, Any], init_weights: str | None, load_head: bool):
        super().__init__()
        self.model = create_model(model, **model_kwargs)
        if init_weights is not None:
            load_weights(self.model, init_weights, load_head=load_head)
        apply_freeze(self.model, self.hparams.freeze, self.hparams.unfreeze_blocks)

    def forward(self, x: torch.Tensor, spacing: torch.Tensor) -> torch.Tensor:
        return self.model(x, spacing)

    def setup(self, stage: str) -> None:
        """Check the data against the model before training (:meth:`PatchDataModule.check_inputs`)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(datamodule, PatchDataModule):
            datamodule.check_inputs(in_chans=self.hparams.in_chans, num_classes=self._voxel_classes())

    def _voxel_classes(self) -> int | None:
        """Classes the voxel labels of the stream must lie in (None: the labels are not voxel maps)."""
        return None

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over :func:`param_groups` (each at ``lr * lr_scale``), linear warm-up, then cosine decay to 0."""
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay, hp.layer_decay)
        for group in groups:
            group["lr"] = hp.lr * group["lr_scale"]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        total = max(int(self.trainer.estimated_stepping_batches), hp.warmup_steps + 1) if self._trainer is not None else 1000
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / max(hp.warmup_steps, 1), total_iters=max(hp.warmup_steps, 1))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - hp.warmup_steps)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[max(hp.warmup_steps, 1)])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        """Export the model with the backbone's pretrained config (intensity rule, modalities) and this run's provenance."""
        hp = self.hparams
        if not hp.export_dir or not self.trainer.is_global_zero:
            return
        base = getattr(self.model.backbone, "pretrained_cfg", None) or PretrainedCfg(architecture=hp.model)
        provenance = {"task": type(self).__name__, "num_classes": hp.num_classes, "steps": int(self.global_step), "backbone": hp.backbone, "backbone_provenance": base.provenance}
        save_pretrained(self.model, dataclasses.replace(base, architecture=hp.model, in_chans=hp.in_chans, provenance=provenance), hp.export_dir)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The weights are in the checkpoint: rebuilding must not need the backbone or init folders."""
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        hparams.update(backbone=None, init_weights=None)
        checkpoint["hyper_parameters"] = hparams

    def _check_labels(self, labels: torch.Tensor, num_classes: int) -> None:
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise SpadkitError(
                f"labels span {int(labels.min())}..{int(labels.max())}, the model has {num_classes} classes (0..{num_classes - 1})",
                fix=f"set num_classes={int(labels.max()) + 1} (model.init_args.num_classes in YAML) or remap the label values.",
            )


class SegFinetune(_Finetune):
    """Fine-tune a SPAD-UNETR on (partially) annotated volumes.

    Args:
        model: registered segmenter (``spad_unetr_test``/``small``/``base``).
        num_classes: classes including background.
        in_chans: image channels.
        backbone: pretrained ViT folder (``MIMPretrain``'s export), or None for scratch.
        init_weights: a fine-tuned checkpoint to continue from (``model.pt`` or ``.ckpt``).
        load_head: load the checkpoint's voxel classifier too (False: a new head, e.g. other classes).
        freeze, unfreeze_blocks: the freezing schedule.
        lr, weight_decay, layer_decay, warmup_steps: optimiser.
        lambda_dice, lambda_ce: weights of the masked Dice (MONAI) and cross-entropy terms.
        surface_tolerance_mm: also log HD95 (mm) and surface Dice at this tolerance (MONAI, in the
            batch's spacing) on fully annotated validation samples (surfaces of partial labels are undefined).
        export_dir: where ``on_train_end`` writes the fine-tuned model (``save_pretrained``), for
            ``create_model(model, pretrained=export_dir, num_classes=...)`` and :func:`spadkit.infer.predict`.
    """

    def __init__(
        self,
        model: str = "spad_unetr_test",
        num_classes: int = 2,
        in_chans: int = 1,
        backbone: str | None = None,
        init_weights: str | None = None,
        load_head: bool = True,
        freeze: Freeze = "full",
        unfreeze_blocks: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        layer_decay: float = 0.75,
        warmup_steps: int = 10,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        surface_tolerance_mm: float | None = None,
        export_dir: str | None = None,
    ):
        self.save_hyperparameters()
        super().__init__(model, {"num_classes": num_classes, "in_chans": in_chans, "backbone": backbone}, init_weights, load_head)
        self.dice_loss = MaskedDiceLoss(include_background=False, softmax=True, batch=True)
        self.dice_metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True, num_classes=num_classes)
        self.surface_metrics: dict[str, Any] = {}
        if surface_tolerance_mm is not None:
            self.surface_metrics = {
                "hd95_mm": HausdorffDistanceMetric(percentile=95, reduction="mean"),
                "surface_dice": SurfaceDiceMetric([surface_tolerance_mm] * (num_classes - 1), reduction="mean"),
            }

    def _voxel_classes(self) -> int:
        return self.hparams.num_classes

    def _targets(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``label`` ``(B, 1, Z, Y, X)`` long and ``annotated`` ``(B, 1, Z, Y, X)`` float (all ones when absent)."""
        label = batch["label"]
        label = (label if label.ndim == 5 else label[:, None]).long()
        annotated = batch.get("annotated")
        annotated = torch.ones_like(label, dtype=torch.bool) if annotated is None else (annotated if annotated.ndim == 5 else annotated[:, None]).bool()
        return label, annotated

    def loss(self, logits: torch.Tensor, label: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        """Masked Dice + cross-entropy over the annotated voxels only.

        Raises:
            SpadkitError: no voxel of the batch is annotated, or a label exceeds ``num_classes``.
        """
        if not annotated.any():
            raise SpadkitError("the batch has an empty annotated mask: nothing to learn from", fix="sample patches from annotated slices only (or annotate some voxels).")
        self._check_labels(label[annotated], logits.shape[1])
        mask = annotated.float()
        label = torch.where(annotated, label, 0)[:, 0]  # unannotated values (e.g. 255 = unknown) are never read
        dice = self.dice_loss(logits, F.one_hot(label, logits.shape[1]).movedim(-1, 1).float(), mask)
        ce = (F.cross_entropy(logits, label, reduction="none") * mask[:, 0]).sum() / mask.sum()
        return self.hparams.lambda_dice * dice + self.hparams.lambda_ce * ce

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        label, annotated = self._targets(batch)
        loss = self.loss(self(batch["image"], batch["spacing"]), label, annotated)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(label))
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        label, annotated = self._targets(batch)
        logits = self(batch["image"], batch["spacing"])
        self.log("val/loss", self.loss(logits, label, annotated), batch_size=len(label), sync_dist=True)
        k = logits.shape[1]
        keep = annotated.float()
        pred = F.one_hot(logits.argmax(1), k).movedim(-1, 1).float() * keep
        target = F.one_hot(torch.where(annotated, label, 0)[:, 0], k).movedim(-1, 1).float() * keep
        self.dice_metric(pred, target)
        full = annotated.flatten(1).all(1)
        for i in full.nonzero()[:, 0].tolist():  # per sample: the metrics take one spacing per call
            for metric in self.surface_metrics.values():
                metric(pred[i : i + 1], target[i : i + 1], spacing=batch["spacing"][i].tolist())

    def on_validation_epoch_end(self) -> None:
        dice = self.dice_metric.aggregate()
        self.dice_metric.reset()
        self.log("val/dice", torch.nan_to_num(dice).mean(), prog_bar=True, sync_dist=True)
        for c, value in enumerate(dice.tolist(), start=1):
            self.log(f"val/dice_{c}", value, sync_dist=True)
        for name, metric in self.surface_metrics.items():
            if metric.get_buffer() is not None:
                self.log(f"val/{name}", float(metric.aggregate()), sync_dist=True)
            metric.reset()


class ClsFinetune(_Finetune):
    """Fine-tune a SPAD classifier (``spad_cls_*``); ``freeze="head"`` with ``head="linear"`` is a linear probe.

    Args (beyond :class:`SegFinetune`'s): ``pool``, ``head``: the classifier's pooling and head.
    Validation logs accuracy, balanced accuracy and AUROC (MONAI metrics).
    """

    def __init__(
        self,
        model: str = "spad_cls_test",
        num_classes: int = 2,
        in_chans: int = 1,
        backbone: str | None = None,
        init_weights: str | None = None,
        load_head: bool = True,
        pool: str = "avg",
        head: str = "linear",
        freeze: Freeze = "full",
        unfreeze_blocks: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        layer_decay: float = 0.75,
        warmup_steps: int = 10,
        label_smoothing: float = 0.0,
        export_dir: str | None = None,
    ):
        self.save_hyperparameters()
        kwargs = {"num_classes": num_classes, "in_chans": in_chans, "backbone": backbone, "pool": pool, "head": head}
        super().__init__(model, kwargs, init_weights, load_head)
        self.confusion = ConfusionMatrixMetric(metric_name=["accuracy", "balanced accuracy"], reduction="mean")
        self.auroc = ROCAUCMetric()

    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self._check_labels(label, logits.shape[1])
        return F.cross_entropy(logits, label, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        label = batch["label"].long().reshape(-1)
        loss = self.loss(self(batch["image"], batch["spacing"]), label)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(label))
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        label = batch["label"].long().reshape(-1)
        logits = self(batch["image"], batch["spacing"])
        self.log("val/loss", self.loss(logits, label), batch_size=len(label), sync_dist=True)
        k = logits.shape[1]
        onehot = F.one_hot(label, k).float()
        self.confusion(F.one_hot(logits.argmax(1), k).float(), onehot)
        self.auroc(logits.softmax(1), onehot)

    def on_validation_epoch_end(self) -> None:
        accuracy, balanced = (m.mean() for m in _as_list(self.confusion.aggregate()))
        self.confusion.reset()
        self.log_dict({"val/accuracy": accuracy, "val/balanced_accuracy": balanced}, prog_bar=True, sync_dist=True)
        self.log("val/auroc", float(self.auroc.aggregate()), sync_dist=True)  # NaN (MONAI warns) if one class only
        self.auroc.reset()


def _as_list(values: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [values] if isinstance(values, torch.Tensor) else list(values)
