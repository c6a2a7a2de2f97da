"""Lightning ``DataModule`` over :class:`~spadkit.data.PatchStream`.

Lightning does not shard an ``IterableDataset``: this module reads the rank
and world size from the trainer in ``setup`` and hands them to the stream,
which gives every rank the same number of batches. Augmentation runs in
``on_after_batch_transfer``, i.e. on the training device, and the stream's
position is saved in checkpoints (``state_dict``) so a resumed run continues
with the batch after the last one trained.

Validation for early stopping comes from separate stores (``val``) or from a
split of the training sources fixed once (``val_fraction``,
:class:`~spadkit.data.plan.Split`): a slice or case is held out by a hash of its
name alone, so labels added later never move an earlier validation item into
training or back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from spadkit.data.augment import BatchAugment
from spadkit.data.patches import LabelSampler, PatchSize, UniformSampler
from spadkit.data.plan import Split
from spadkit.data.reader import Intensity
from spadkit.data.sources import DatasetSource, Mixing
from spadkit.data.stream import PatchStream, StreamLoader
from spadkit.errors import SpadkitError
from spadkit.models.spad import total_stride

#: Named ``patch_multiple`` rules for configs: "spad" is the SPAD model's voxels per token along each axis.
PATCH_MULTIPLE_RULES: dict[str, Callable[..., tuple[int, int, int]]] = {"spad": total_stride}


class PatchDataModule(L.LightningDataModule):
    """Training (and optional validation) patch streams for a Lightning ``Trainer``.

    Args:
        train: training stores or :class:`DatasetSource` objects.
        val: validation sources (default none); streamed with a fixed epoch, so
            every validation sees the same patches.
        val_fraction: instead of ``val``, hold out this share of the training sources'
            annotated slices (``val_by="slice"``: Z slices, axial in RAS stores) or cases
            (``val_by="case"``) for validation, chosen by a hash of each item's name
            (:class:`~spadkit.data.plan.Split`): fixed once, never reshuffled when labels
            are added. Training never sees the held-out labels (they read as unknown).
        val_by: ``"slice"`` or ``"case"`` (see ``val_fraction``).
        patch_size: patch edge in voxels (along the finest axis when ``spacing_aware``).
        patch_mm: patch extent in mm instead (overrides ``patch_size``).
        patch_tokens: a fixed token grid ``(Z, Y, X)`` instead, as PUMIT's crops (``[5, 10, 10]``;
            2D cases get one depth token), zoomed and resampled (overrides ``patch_size`` and
            ``patch_mm``; see :class:`PatchSize`). Voxels per token: :func:`spadkit.models.total_stride`
            unless ``patch_multiple`` says otherwise.
        patch_zoom, patch_zoom_prob, patch_zoom_z, patch_zoom_z_prob: zoom of ``patch_tokens``
            crops (PUMIT's defaults, see :class:`PatchSize`).
        patch_multiple: round patch edges to multiples of this: an int, ``(Z, Y, X)``, or the
            name of a rule in :data:`PATCH_MULTIPLE_RULES`: ``"spad"`` is the SPAD model's voxels
            per token (:func:`spadkit.models.total_stride`), so every patch tokenises exactly.
            Configs name rules, never functions: a YAML cannot make spadkit import code.
        spacing_aware: see :class:`PatchSize`.
        batch_size, samples_per_case, mixing, visits_per_epoch, seed, num_threads,
        cache_bytes, intensity: see :class:`PatchStream`.
        sampler: ``"uniform"`` or ``"label"`` (foreground oversampling; the sources
            need ``label=...``).
        foreground_ratio: share of foreground-centred patches for ``sampler="label"``.
        num_workers: DataLoader worker processes (0: threads in the training process,
            usually fastest, see benchmarks/loader.py).
        augment: a :class:`BatchAugment`, ``True`` for the default one, ``"pumit"`` for
            :meth:`BatchAugment.pumit` (PUMIT's pretraining augmentation), or ``None``.
        pin_memory: pin batches for faster host-to-GPU copies.
        joint_classes: ``K`` (background included) to mix cases of every annotation level
            (masks, boxes, image classes, none) in one batch, with the keys of
            :class:`PatchStream` ``joint_classes`` (UniMed's joint learning).
    """

    def __init__(
        self,
        train: Sequence[DatasetSource | str | Path],
        val: Sequence[DatasetSource | str | Path] | None = None,
        val_fraction: float = 0.0,
        val_by: Literal["slice", "case"] = "slice",
        patch_size: int | Sequence[int] = 96,
        patch_mm: float | Sequence[float] | None = None,
        patch_tokens: int | Sequence[int] | None = None,
        patch_zoom: tuple[float, float] = (0.75, 2.0),
        patch_zoom_prob: float = 0.5,
        patch_zoom_z: tuple[float, float] = (0.8, 1.25),
        patch_zoom_z_prob: float = 0.3,
        patch_multiple: int | Sequence[int] | Literal["spad"] = 1,
        spacing_aware: bool = True,
        batch_size: int = 2,
        samples_per_case: int = 8,
        mixing: Mixing = "proportional",
        visits_per_epoch: int | None = None,
        seed: int = 0,
        sampler: Literal["uniform", "label"] = "uniform",
        foreground_ratio: float = 0.33,
        num_threads: int = 2,
        num_workers: int = 0,
        cache_bytes: int = 512 << 20,
        intensity: Intensity = "percentile",
        augment: BatchAugment | bool | Literal["pumit"] | None = None,
        pin_memory: bool = False,
        joint_classes: int | None = None,
    ):
        super().__init__()
        if sampler not in ("uniform", "label"):
            raise ValueError(f"sampler must be 'uniform' or 'label', not {sampler!r}")
        self.train_sources = list(train)
        self.val_sources = list(val or [])
        if val_fraction and self.val_sources:
            raise SpadkitError(
                "both val=[...] stores and val_fraction are given: validation would come from two places",
                fix="use val=[...] for separate validation stores, or val_fraction to hold out part of the training sources, not both.",
            )
        self.split = Split(val_fraction, val_by) if val_fraction else None
        multiple = patch_multiple_rule(patch_multiple) if isinstance(patch_multiple, str) else patch_multiple
        if patch_tokens is not None:
            zoom = {"zoom": tuple(patch_zoom), "zoom_prob": patch_zoom_prob, "zoom_z": tuple(patch_zoom_z), "zoom_z_prob": patch_zoom_z_prob}
            size = PatchSize(tokens=patch_tokens, multiple=multiple, **zoom)
        elif patch_mm is not None:
            size = PatchSize(mm=patch_mm, multiple=multiple)
        else:
            size = PatchSize(voxels=patch_size, spacing_aware=spacing_aware, multiple=multiple)
        self.stream_args: dict[str, Any] = {
            "patch_size": size,
            "batch_size": batch_size,
            "samples_per_case": samples_per_case,
            "mixing": mixing,
            "seed": seed,
            "sampler": LabelSampler(foreground_ratio) if sampler == "label" else UniformSampler(),
            "num_threads": num_threads,
            "cache_bytes": cache_bytes,
            "intensity": intensity,
            "joint_classes": joint_classes,
        }
        self.visits_per_epoch = visits_per_epoch
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        if augment not in (None, False, True, "pumit") and not isinstance(augment, BatchAugment):
            raise ValueError(f"augment must be a BatchAugment, True, 'pumit' or None, not {augment!r}")
        self.augment = BatchAugment(seed=seed) if augment is True else BatchAugment.pumit(seed=seed) if augment == "pumit" else (augment or None)
        self.train_stream: PatchStream | None = None
        self.val_stream: PatchStream | None = None
        self._pending_state: dict[str, Any] | None = None

    def _place(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str | None = None) -> None:
        rank, world = self._place()
        if self.train_stream is None and stage in (None, "fit"):
            self.train_stream = PatchStream(self.train_sources, visits_per_epoch=self.visits_per_epoch, rank=rank, world_size=world, split=self.split, **self.stream_args)
            self.train_stream.auto_mark = False  # Lightning fetches ahead: on_after_batch_transfer marks instead
            if self._pending_state is not None:
                self.train_stream.load_state_dict(self._pending_state)
        if self.val_stream is None and (self.val_sources or self.split) and stage in (None, "fit", "validate"):
            sources, split = (self.train_sources, dataclasses.replace(self.split, part="validation")) if self.split else (self.val_sources, None)
            self.val_stream = PatchStream(sources, rank=rank, world_size=world, fixed_epoch=0, split=split, **self.stream_args)

    def check_inputs(self, in_chans: int, num_classes: int | None = None) -> None:
        """Check the streams' cases against a model before training (:meth:`PatchStream.check_inputs`)."""
        self.setup("fit")
        for stream in (self.train_stream, self.val_stream):
            if stream is not None:
                stream.check_inputs(in_chans, num_classes)

    def _loader(self, stream: PatchStream) -> StreamLoader:
        return StreamLoader(stream, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def train_dataloader(self) -> StreamLoader:
        self.setup("fit")
        return self._loader(self.train_stream)

    def val_dataloader(self) -> StreamLoader | list:
        self.setup("validate")
        return self._loader(self.val_stream) if self.val_stream is not None else []

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self.train_stream.mark_consumed(batch["stream"])
            if self.augment is not None:
                batch = augment_with_mask(self.augment, batch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"train_stream": self.train_stream.state_dict()} if self.train_stream is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stream_state = state_dict.get("train_stream")
        if stream_state is None:
            return
        if self.train_stream is not None:
            self.train_stream.load_state_dict(stream_state)
        else:
            self._pending_state = stream_state


def augment_with_mask(augment: BatchAugment, batch: dict[str, Any]) -> dict[str, Any]:
    """``augment(batch)`` with ``batch["annotated"]`` flipped and rotated exactly like ``batch["label"]``.

    :class:`BatchAugment` moves the label only, so the mask travels inside it: ``label + 1``
    where annotated, 0 where unknown, split again afterwards. Corners a rotation brings in
    from outside the patch (label 0) thus read as unknown, not as background.
    """
    if "annotated" not in batch:
        return augment(batch)
    batch["label"] = torch.where(batch.pop("annotated"), batch["label"] + 1, 0)
    batch = augment(batch)
    batch["annotated"] = batch["label"] > 0
    batch["label"] = (batch["label"] - 1).clamp_(min=0)
    return batch


def patch_multiple_rule(name: str) -> Callable[..., tuple[int, int, int]]:
    """The function of the spacing that a named ``patch_multiple`` rule stands for (see :data:`PATCH_MULTIPLE_RULES`)."""
    if name not in PATCH_MULTIPLE_RULES:
        raise SpadkitError(
            f"patch_multiple {name!r} is not a named rule",
            fix=f"use one of {', '.join(map(repr, PATCH_MULTIPLE_RULES))} (e.g. patch_multiple: spad), an int or [Z, Y, X].",
        )
    return PATCH_MULTIPLE_RULES[name]
