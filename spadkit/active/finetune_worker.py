"""The child side of a full fine-tune: train a SPAD-UNETR on a session's corrections, in its own process.

:func:`run_job` is what the separate process runs (see :mod:`spadkit.active.finetune` for the
parent side). It gets nothing from the parent's memory, only the job folder, whose ``spec.json``
names the store, case, label map, the label *version* to learn from and the session's saved model.
Everything else is read from the store:

* the label of that version and its record (:mod:`spadkit.active.history`): the *training* items
  (validation items are never trained on), intersected with the store's annotated mask when the
  version has one; voxels outside are unknown, never background;
* the image, normalised as the session normalises it.

The model is the session's SPAD-UNETR, or a SPAD-UNETR built on the session's SPAD-ViT
(``spad_vit_X`` -> ``spad_unetr_X``, a new decoder). Training: AdamW over
:func:`~spadkit.tasks.finetune.param_groups` (layer-wise decay), linear warm-up then cosine, on
random crops that cross a training item, with the masked Dice + cross-entropy of
:meth:`SegFinetune.loss <spadkit.tasks.finetune.SegFinetune.loss>`. Progress goes to
``progress.json`` after every step.

Output, all inside ``JOB/weights.partial/`` first: ``model.pt`` + ``pretrained_cfg.json``
(``save_pretrained``), ``features.pt`` (the fine-tuned backbone's voxel features, so the parent
can score and swap without running the backbone), ``result.json``. Only when all are written and
fsync'd is the folder renamed to ``JOB/weights/`` (atomic), then ``progress.json`` says ``done``.
A process killed at any moment leaves no ``weights/`` folder, so nothing half-written is scored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spadkit.active import features_cache as cache
from spadkit.active.history import decode, item_box, region_mask
from spadkit.atomic import fsync_dir
from spadkit.errors import SpadkitError

SPEC, PROGRESS, LOG = "spec.json", "progress.json", "log.txt"
WEIGHTS, PARTIAL, FEATURES, RESULT = "weights", "weights.partial", "features.pt", "result.json"
#: Crops per optimiser step.
BATCH = 2
#: What the child imports lazily; the fork server imports it once, so children start at once.
PRELOAD = ("spadkit.tasks.finetune", "spadkit.io.omezarr", "spadkit.infer")


def write_progress(job: Path, **values: Any) -> None:
    """Replace ``JOB/progress.json`` (rename over it: a reader sees the old or the new file, never half of one)."""
    tmp = job / f".{PROGRESS}.{os.getpid()}"
    tmp.write_text(json.dumps(values))
    os.replace(tmp, job / PROGRESS)


def read_progress(job: Path) -> dict[str, Any]:
    """The last progress the child wrote (``{}`` before its first)."""
    try:
        return json.loads((job / PROGRESS).read_text())
    except (OSError, ValueError):
        return {}


def unetr_name(architecture: str) -> str:
    """The registered SPAD-UNETR for a session model's architecture (itself, or ``spad_vit_X`` -> ``spad_unetr_X``).

    Raises:
        SpadkitError: no registered SPAD-UNETR is built on that backbone.
    """
    from spadkit.models import list_models

    name = architecture if architecture.startswith("spad_unetr_") else architecture.replace("spad_vit_", "spad_unetr_", 1)
    if name not in list_models("spad_unetr_*"):
        raise SpadkitError(
            f"full fine-tuning needs a SPAD-ViT or SPAD-UNETR session model, not {architecture!r}",
            fix=f"start the session with one of {', '.join(list_models('spad_unetr_*') + list_models('spad_vit_*'))}.",
        )
    return name


def build_task(folder: Path, num_classes: int) -> Any:
    """A :class:`~spadkit.tasks.finetune.SegFinetune` on the session's saved model (its loss, freezing and groups)."""
    from spadkit.models.registry import CFG_FILE, WEIGHTS_FILE, PretrainedCfg
    from spadkit.tasks.finetune import SegFinetune

    cfg = PretrainedCfg.from_json((folder / CFG_FILE).read_text(), folder / CFG_FILE)
    name = unetr_name(cfg.architecture)
    if name == cfg.architecture:
        task = SegFinetune(model=name, num_classes=num_classes, in_chans=cfg.in_chans, init_weights=str(folder / WEIGHTS_FILE))
    else:
        task = SegFinetune(model=name, num_classes=num_classes, in_chans=cfg.in_chans, backbone=str(folder))
    provenance = {"task": "AnnotationSession fine-tune", "num_classes": num_classes, "backbone": cfg.architecture, "backbone_provenance": cfg.provenance}
    task.model.pretrained_cfg = dataclasses.replace(cfg, architecture=name, provenance=provenance)
    return task


def training_mask(store: Any, case_id: str, name: str, version: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """``(Z, Y, X)`` bool voxels to train on, and the boxes of the training items, read from the store.

    Raises:
        SpadkitError: the version is not a session version, or it has no training item.
    """
    entry = next((v for v in store.label_versions(case_id, name) if v["version"] == version), None)
    record = None if entry is None else decode(str(entry.get("message", "")))
    items = [i for i in (record or {}).get("annotated", []) if i.get("split") == "train"]
    if not items:
        raise SpadkitError(f"label {name!r} version {version} has no training correction", fix="correct a few slices first.")
    mask = region_mask(items, shape)
    annotated = store.read_annotated(case_id, name, version)
    if annotated is not None:
        mask &= np.asarray(annotated[...], bool)
    return mask, [item_box(i, shape) for i in items]


def sample_crop(boxes: list[tuple[slice, ...]], shape: tuple[int, ...], crop: tuple[int, ...], rng: np.random.Generator) -> tuple[slice, ...]:
    """A box of ``crop`` voxels (less where the grid is smaller) around a random voxel of a random item (items weighted by voxels)."""
    sizes = np.array([math.prod(b.stop - b.start for b in box) for box in boxes], float)
    box = boxes[rng.choice(len(boxes), p=sizes / sizes.sum())]
    out = []
    for part, n, c in zip(box, shape, crop):
        c = min(c, n)
        centre = int(rng.integers(part.start, part.stop))
        start = int(np.clip(centre - c // 2 + rng.integers(-(c // 4), c // 4 + 1), 0, n - c))
        out.append(slice(start, start + c))
    return tuple(out)


def padded(array: np.ndarray, crop: tuple[int, ...]) -> np.ndarray:
    """``(C, z, y, x)`` zero-padded at the end to ``(C, *crop)`` (False/0 for masks and labels: unknown voxels)."""
    return np.pad(array, [(0, 0)] + [(0, c - n) for c, n in zip(crop, array.shape[1:])])


def train(task: Any, image: np.ndarray, spacing: tuple[float, ...], label: np.ndarray, mask: np.ndarray, boxes: list, spec: dict[str, Any], job: Path) -> float | None:
    """Run ``spec["max_steps"]`` AdamW steps; returns the last loss."""
    from spadkit.infer import default_window
    from spadkit.tasks.finetune import param_groups

    device = torch.device(spec["device"])
    model = task.model.to(device).train()
    hp = task.hparams
    groups = param_groups(model, hp.weight_decay, hp.layer_decay)
    for group in groups:
        group["lr"] = spec["lr"] * group["lr_scale"]
    optimizer = torch.optim.AdamW(groups)
    steps, warmup = spec["max_steps"], max(1, min(hp.warmup_steps, spec["max_steps"] // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(steps - warmup, 1))))
    crop = default_window(label.shape, spacing, (spec["crop_tokens"],) * 3)
    rng = np.random.default_rng(spec["seed"])
    spacing_t = torch.tensor([spacing] * BATCH, dtype=torch.float32, device=device)
    loss_value = None
    for step in range(1, steps + 1):
        crops = [sample_crop(boxes, label.shape, crop, rng) for _ in range(BATCH)]
        x, y, known = (torch.from_numpy(np.stack([padded(a[(Ellipsis, *c)], crop) for c in crops])).to(device) for a in (image, label[None], mask[None]))
        loss = task.loss(model(x, spacing_t), y, known)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        write_progress(job, state="running", step=step, max_steps=steps, loss=loss_value, message=f"step {step}/{steps}, loss {loss_value:.4f}", pid=os.getpid())
    return loss_value


@torch.no_grad()
def network_dice(model: torch.nn.Module, image: np.ndarray, spacing: tuple[float, ...], label: np.ndarray, boxes: list, num_classes: int, device: str) -> float | None:
    """Dice of the network alone (sliding window) on the validation boxes (for the record; the parent decides)."""
    from spadkit.active.session import dice
    from spadkit.infer import predict

    if not boxes:
        return None
    pred = [np.asarray(predict(model, image, spacing, region=b, device=device).labels).ravel() for b in boxes]
    return dice(np.concatenate(pred), np.concatenate([label[b].ravel() for b in boxes]), num_classes)


def run_job(job_dir: str) -> None:
    """Train, then publish ``JOB/weights/`` atomically (see the module docstring). Exits 1 on failure."""
    job = Path(job_dir)
    start = time.perf_counter()
    try:
        spec = json.loads((job / SPEC).read_text())
        torch.set_num_threads(int(spec["threads"]))
        torch.manual_seed(spec["seed"])
        write_progress(job, state="running", step=0, max_steps=spec["max_steps"], loss=None, message="reading the corrections", pid=os.getpid())
        from spadkit.io.omezarr import OMEZarrStore
        from spadkit.models import save_pretrained

        store = OMEZarrStore(spec["store"], mode="r")
        case, name, version = spec["case"], spec["label"], int(spec["version"])
        task = build_task(Path(spec["model"]), spec["num_classes"])
        image, spacing = cache.normalised_image(store, case, task.model)
        label = np.asarray(store.read_label(case, name, version).numpy()[0], np.int64)
        mask, boxes = training_mask(store, case, name, version, label.shape)
        loss = train(task, image, spacing, label, mask, boxes, spec, job)
        write_progress(job, state="running", step=spec["max_steps"], max_steps=spec["max_steps"], loss=loss, message="writing the weights and features", pid=os.getpid())
        model = task.model.eval()
        validation = [item_box(i, label.shape) for i in spec["validation_items"]]
        network = network_dice(model, image, spacing, label, validation, spec["num_classes"], spec["device"]) if spec["score_network"] else None
        model = model.cpu()
        features = cache.extract_features(model, image, spacing, components=cache.COMPONENTS, max_tokens=cache.MAX_TOKENS)
        partial = job / PARTIAL
        save_pretrained(model, model.pretrained_cfg, partial)
        torch.save(features.state_dict(), partial / FEATURES)
        result = {"steps": spec["max_steps"], "loss": loss, "seconds": time.perf_counter() - start, "version": version, "network_validation_dice": network, "device": spec["device"]}
        (partial / RESULT).write_text(json.dumps(result))
        for path in partial.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(partial)
        os.replace(partial, job / WEIGHTS)
        fsync_dir(job)
        write_progress(job, state="done", step=spec["max_steps"], max_steps=spec["max_steps"], loss=loss, message=f"done in {result['seconds']:.1f} s", pid=os.getpid())
    except Exception as error:  # report any failure (a bad spec, a SpadkitError, out of memory) to the parent
        with open(job / LOG, "a") as log:
            traceback.print_exc(file=log)
        last = read_progress(job)
        write_progress(job, **{**last, "state": "failed", "message": f"{type(error).__name__}: {error}", "pid": os.getpid()})
        sys.exit(1)


if __name__ == "__main__":
    run_job(sys.argv[1])
