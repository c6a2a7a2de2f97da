"""Helpers for the task tests: dict batches, a quiet CPU Trainer, deterministic loss evaluation."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import numpy as np
import torch


def make_batch(images: list[np.ndarray], spacings: list[tuple[float, float, float]], modalities: list[str]) -> dict[str, Any]:
    """A dict batch shaped like :class:`~spadkit.data.PatchStream`'s (the keys the tasks read)."""
    return {
        "image": torch.from_numpy(np.stack(images)[:, None].copy()),  # (B, 1, Z, Y, X) float32 in [0, 1]
        "spacing": torch.tensor(spacings, dtype=torch.float64),  # (B, 3) mm
        "modality": list(modalities),
        "position": torch.tensor([0, 0]),  # (epoch, batch index)
    }


def loader(batches: list[dict[str, Any]]) -> torch.utils.data.DataLoader:
    """A DataLoader yielding the given (already collated) batches in turn."""
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


def fit(module: L.LightningModule, batches: list[dict[str, Any]], steps: int, **trainer_kwargs: Any) -> L.Trainer:
    """Fit ``steps`` optimiser steps on CPU, quietly."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    module.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*but have no `val_dataloader`.*")
        trainer.fit(module, loader(batches))
    return trainer


def evaluate(module: L.LightningModule, batches: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Each batch's losses in eval mode with a fixed seed (so MIM/MAE masks repeat)."""
    module.eval()
    out = []
    with torch.no_grad():
        for batch in batches:
            torch.manual_seed(123)
            losses = module.losses(batch)
            losses = losses[0] if isinstance(losses, tuple) else losses
            out.append({k: float(v) for k, v in losses.items()})
    return out
