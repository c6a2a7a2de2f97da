"""``AnnotationSession``: predict, correct a slice, learn from it at once, suggest the next slice.

The same object serves the napari plugin, the notebooks and the CLI (no GUI imports here)::

    session = AnnotationSession(store, "brain", create_model("spad_vit_small"))
    shown = session.predict((slice(90, 91),))            # a slab of axial slices on screen
    hint = session.suggest_next()                         # Suggestion(axis, index, score, reason)
    rnd = session.submit_correction(hint.axis, hint.index, mask2d)
    rnd.prediction                                        # the visible region, re-predicted
    session.undo(); session.redo(); session.history()
    session = AnnotationSession.resume(store, "brain")    # after a crash
    job = session.start_finetune(max_steps=200)           # full learning, in another process
    job.progress(); job.cancel(); session.poll_finetune() # see spadkit.active.finetune

Order of a submission: the mask is checked, the label version is saved through
``OMEZarrStore.save_label`` (its record, see :mod:`spadkit.active.history`, is in
the same atomic metadata write), and only then the light head
(:mod:`spadkit.models.light_head`) is refitted on the cached features of every
*training* item and the visible region re-predicted. Every
:data:`~spadkit.active.history.VALIDATION_EVERY`-th new item is kept for
validation instead (fixed once, never reshuffled); its Dice is reported per round.
Quality signals and timings per round, and every fine-tune's decision, go to ``session.json``
(derived data). The store itself records each version's annotated voxels
(``save_label(annotated=...)``, read back by :attr:`AnnotationSession.annotated`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spadkit.active import features_cache as cache
from spadkit.active import finetune
from spadkit.active.finetune import FinetuneJob, FinetuneResult
from spadkit.active.history import (
    AXIS_NAMES,
    Log,
    decode,
    encode,
    item_box,
    item_key,
    region_mask,
    replay,
    split_of,
)
from spadkit.active.suggest import Suggestion, rank_slices
from spadkit.atomic import atomic_path
from spadkit.errors import SpadkitError, StoreError
from spadkit.io.omezarr import check_name
from spadkit.models.light_head import LightHead, VoxelFeatures, fit_light_head, predict_light_head
from spadkit.models.unetr import SpadUNETR
from spadkit.volume import LabelVolume

Box = tuple[slice, slice, slice]


@dataclasses.dataclass
class SessionPrediction:
    """Prediction of a region: ``probs`` ``(K, z, y, x)`` float32, ``labels`` ``(z, y, x)`` uint8,
    ``uncertainty`` ``(z, y, x)`` entropy in nats, the ``region`` of the full grid, and the ``model``
    version that made it (``"<backbone hash>"`` cold, ``"<hash>/head@v<N>"`` after fitting on version N)."""

    probs: np.ndarray
    labels: np.ndarray
    uncertainty: np.ndarray
    region: Box
    model: str


@dataclasses.dataclass
class Round:
    """What one submission, undo or redo did; ``timings`` in seconds (save, fit, predict, refresh = save to
    refreshed region, validation)."""

    version: int
    op: str
    voxels_changed: int
    edit_dice: float | None
    changed_fraction: float | None
    validation_dice: float | None
    timings: dict[str, float]
    prediction: SessionPrediction | None

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "prediction"}


def load_saved_model(folder: str | Path) -> nn.Module:
    """The model in a ``save_pretrained`` folder, built from the architecture its ``pretrained_cfg.json`` names
    (with the class count its provenance records, for fine-tuned segmenters)."""
    from spadkit.models import create_model
    from spadkit.models.registry import CFG_FILE, PretrainedCfg

    cfg_file = Path(folder) / CFG_FILE
    if not cfg_file.is_file():
        raise SpadkitError("not a save_pretrained folder", path=folder, fix="point at a folder with model.pt and pretrained_cfg.json.")
    cfg = PretrainedCfg.from_json(cfg_file.read_text(), cfg_file)
    kwargs = {"num_classes": int(cfg.provenance["num_classes"])} if "num_classes" in cfg.provenance else {}
    return create_model(cfg.architecture, pretrained=str(folder), **kwargs)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run torch with ``threads`` intra-op threads inside the block (None: unchanged).

    The light head's tensors are small (thousands of voxels, tens of features): on a
    busy 2-core machine one thread fitted it 3-5x faster than two (measured).
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def dice(pred: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """Mean foreground Dice over classes 1..K-1 present in either array (1.0 when none is)."""
    scores = []
    for k in range(1, num_classes):
        p, t = pred == k, target == k
        total = int(p.sum()) + int(t.sum())
        if total:
            scores.append(2.0 * int((p & t).sum()) / total)
    return float(np.mean(scores)) if scores else 1.0


class AnnotationSession:
    """An annotation loop on one case of an ``OMEZarrStore`` (see the module docstring).

    Args:
        store: an ``OMEZarrStore`` (mode ``"a"`` to submit; ``"r"`` allows predict/suggest only).
        case_id: the case.
        model: a SPAD-ViT, or a model with a ``backbone`` (its features are used; frozen). A SPAD-UNETR
            also predicts the first slices, before any correction (its output classes must be ``num_classes``).
        label_name: the label map the corrections are saved to (a new one is created).
        num_classes: classes of the segmentation, background 0 included.
        author: recorded with every version (default: the OS user).
        hidden, steps, max_voxels: light-head settings (see :func:`~spadkit.models.light_head.fit_light_head`).
        head_threads: torch threads while the light head fits, predicts and ranks slices (None: torch's setting).

    Raises:
        StoreError: no such case, an invalid label name.
        SpadkitError: the model's channels do not fit the case, a remote store.
    """

    def __init__(
        self,
        store: Any,
        case_id: str,
        model: nn.Module,
        label_name: str = "seg",
        *,
        num_classes: int = 2,
        author: str | None = None,
        hidden: int = 32,
        steps: int = 100,
        max_voxels: int = 5000,
        head_threads: int | None = 1,
    ):
        start = time.perf_counter()
        check_name(label_name, "label name", store.url)
        self.store, self.case_id, self.label_name, self.author = store, case_id, label_name, author
        self.model, self.num_classes = model, int(num_classes)
        self._segments = isinstance(model, SpadUNETR)
        self.fit_settings = {"hidden": hidden, "steps": steps, "max_voxels": max_voxels}
        self.head_threads = head_threads
        image = store.read_image(case_id)
        in_chans = getattr(getattr(model, "backbone", model), "in_chans", image.shape[0])
        if in_chans != image.shape[0]:
            raise SpadkitError(
                f"the model takes {in_chans}-channel images, case {case_id} has {image.shape[0]} channels",
                path=f"{store.url}/{case_id}",
                fix=f"use a model built with in_chans={image.shape[0]} (create_model(name, in_chans={image.shape[0]})).",
            )
        if self._segments and max(model.num_classes, 2) != self.num_classes:
            raise SpadkitError(
                f"the segmentation model predicts {max(model.num_classes, 2)} classes, the session has num_classes={self.num_classes}",
                fix=f"start the session with num_classes={max(model.num_classes, 2)}.",
            )
        self.shape, self.affine = tuple(image.spatial_shape), image.affine
        self.folder = cache.session_dir(store, case_id, label_name)
        self.backbone_version = cache.model_hash(model)
        self.image, self.spacing = cache.normalised_image(store, case_id, model)
        t_features = time.perf_counter()
        self.features, from_cache = cache.load_or_extract(store, case_id, model, self.image, self.spacing, self.backbone_version)
        self.startup = {"features_s": time.perf_counter() - t_features, "features_from_cache": from_cache}
        state = self._read_state()
        self._rounds, self._finetunes = state.get("rounds", []), state.get("finetunes", [])
        self._job: FinetuneJob | None = None
        self.visible: Box | None = None
        self._shown: SessionPrediction | None = None
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch imports its optimiser machinery once (seconds)
        self._load_log()
        if self.store.mode != "r":
            self._save_model()
            self._write_state()
            finetune.clean_stale_jobs(self.folder)
        self.startup["total_s"] = time.perf_counter() - start

    # ------------------------------------------------------------------ resume and state
    @classmethod
    def resume(cls, store: Any, case_id: str, model: nn.Module | None = None, label_name: str = "seg", **kwargs: Any) -> AnnotationSession:
        """Reopen a session from the store: corrections, undo/redo stacks, validation split and model.

        Without ``model`` the copy the session saved at its start is loaded (``create_model`` with
        ``pretrained=``). Everything else is replayed from the label versions.

        Raises:
            SpadkitError: no session state for this case and label, or its saved model is gone.
        """
        state_file = cache.session_dir(store, case_id, label_name) / "session.json"
        if not state_file.is_file():
            raise SpadkitError("no annotation session to resume", path=state_file, fix="start one with AnnotationSession(store, case_id, model).")
        state = json.loads(state_file.read_text())
        if model is None:
            folder = state_file.parent / "models" / str(state.get("model", ""))
            if not (folder / "pretrained_cfg.json").is_file():
                raise SpadkitError("the session's model was not saved", path=folder, fix="pass model= (the backbone the session used).")
            model = load_saved_model(folder)
        kwargs.setdefault("num_classes", int(state.get("num_classes", 2)))
        return cls(store, case_id, model, label_name, **kwargs)

    def _read_state(self) -> dict[str, Any]:
        path = self.folder / "session.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            warnings.warn(f"{path}: unreadable session state; quality signals of earlier rounds are lost (corrections are not)", stacklevel=3)
            return {}

    def _write_state(self) -> None:
        state = {"model": self.backbone_version, "num_classes": self.num_classes, "label": self.label_name, "rounds": self._rounds, "finetunes": self._finetunes}
        with atomic_path(self.folder / "session.json") as tmp:
            Path(tmp).write_text(json.dumps(state, indent=1))

    def _save_model(self) -> None:
        from spadkit.models import save_pretrained

        cfg = getattr(self.model, "pretrained_cfg", None)
        folder = self.folder / "models" / self.backbone_version
        if cfg is not None and not (folder / "pretrained_cfg.json").is_file():
            save_pretrained(self.model, cfg, folder)

    def _load_log(self) -> None:
        """Replay the label versions into the current label, annotated items and head."""
        versions = self.store.label_versions(self.case_id, self.label_name) if self.label_name in self.store.label_names(self.case_id) else []
        self.log: Log = replay(versions)
        if self.log.foreign and self.log.entries:
            warnings.warn(f"label versions {self.log.foreign} were saved outside the session: their content is kept", stacklevel=3)
        self._label = self._read_version(self.log.latest)
        self._state_version = self.log.latest
        self.items = self.log.annotated
        self._fit()

    def _read_version(self, version: int) -> np.ndarray:
        if not version:
            return np.zeros(self.shape, np.int32)
        return np.asarray(self.store.read_label(self.case_id, self.label_name, version).numpy()[0], np.int32)

    # ------------------------------------------------------------------ prediction
    @property
    def model_version(self) -> str:
        """The version of what predicts now: the backbone hash, plus the head's fitting version."""
        return self.backbone_version if self.head is None else f"{self.backbone_version}/head@v{self._head_version}"

    @property
    def state_version(self) -> int:
        """The label version the session's state (label, items, head) corresponds to (0: none yet)."""
        return self._state_version

    def _fit(self) -> None:
        self.head = self._fit_head(self.features)
        self._head_version = self._state_version

    def _fit_head(self, features: VoxelFeatures) -> LightHead | None:
        """A light head on ``features`` of the training items (None without any)."""
        train = region_mask(self.items, self.shape, "train")
        if not train.any():
            return None
        with torch_threads(self.head_threads):
            return fit_light_head(features, self._label, train, num_classes=self.num_classes, **self.fit_settings)

    def _box(self, region: Sequence[slice | int] | None) -> Box:
        parts = list(region or ())
        if len(parts) > 3:
            raise SpadkitError(f"a region has at most 3 axes (z, y, x), got {len(parts)}", fix="pass e.g. (slice(90, 98),) for a slab of axial slices.")
        box = []
        for axis, n in enumerate(self.shape):
            part = parts[axis] if axis < len(parts) else slice(None)
            part = slice(part, part + 1) if isinstance(part, int | np.integer) else part
            start, stop, step = part.indices(n)
            if step != 1 or stop <= start or (part.start is not None and not 0 <= int(part.start) < n) or (part.stop is not None and int(part.stop) > n):
                raise SpadkitError(f"region {region} is outside the {AXIS_NAMES[axis]} axis 0..{n - 1} or empty", fix=f"use slices within the grid {self.shape}.")
            box.append(slice(start, stop))
        return tuple(box)

    @torch.no_grad()
    def _predict_box(self, box: Box) -> SessionPrediction:
        if self.head is not None:
            with torch_threads(self.head_threads):
                probs = predict_light_head(self.head, self.features, box).numpy()
        elif self._segments:  # a segmentation model (SPAD-UNETR) predicts before any correction
            from spadkit.infer import predict

            probs = np.asarray(predict(self.model, self.image, self.spacing, region=box).probs)
        else:
            probs = np.full((self.num_classes, *(b.stop - b.start for b in box)), 1.0 / self.num_classes, np.float32)
        entropy = -(probs * np.log(np.maximum(probs, 1e-12))).sum(0)
        return SessionPrediction(probs, probs.argmax(0).astype(np.uint8), entropy.astype(np.float32), box, self.model_version)

    def predict(self, region: Sequence[slice | int] | None = None) -> SessionPrediction:
        """Probabilities, labels and uncertainty of the volume or a region; the region becomes the visible one
        (re-predicted after every submission).

        Args:
            region: up to three ``(z, y, x)`` slices or indices, e.g. ``(slice(90, 98),)``.
        """
        self.visible = self._box(region)
        self._shown = self._predict_box(self.visible)
        return self._shown

    def _prediction_of(self, box: Box) -> np.ndarray | None:
        """The labels the user saw in ``box`` (the last prediction when it covers the box and is current)."""
        if self.head is None and not self._segments:
            return None  # a uniform guess is no prediction: no edit Dice
        shown = self._shown
        if shown is not None and shown.model == self.model_version and all(s.start <= b.start and b.stop <= s.stop for s, b in zip(shown.region, box)):
            return shown.labels[tuple(slice(b.start - s.start, b.stop - s.start) for s, b in zip(shown.region, box))]
        return self._predict_box(box).labels

    # ------------------------------------------------------------------ corrections
    def _check_writable(self) -> None:
        if self.store.mode == "r":
            raise StoreError("the store is open read-only: corrections cannot be saved", path=self.store.url, fix="open it with OMEZarrStore(url, mode='a').")

    def _parse(self, axis: int | str | None, index: int | None, mask: Any, region: Sequence[slice] | None) -> tuple[dict[str, Any], Box, np.ndarray]:
        values = np.asarray(mask)
        if values.dtype != bool and not np.issubdtype(values.dtype, np.integer):
            raise SpadkitError(f"a correction mask must be bool or integer class labels, got {values.dtype}", fix="pass mask.astype(bool) or integer labels 0..K-1.")
        if axis is None:
            box = self._box(region)
            item = {"box": [[b.start, b.stop] for b in box]}
        else:
            axis = AXIS_NAMES.index(axis) if isinstance(axis, str) and axis in AXIS_NAMES else axis
            if isinstance(axis, bool) or not isinstance(axis, int | np.integer) or not 0 <= axis < 3:
                raise SpadkitError(f"axis {axis!r} is not 0 (z), 1 (y) or 2 (x)", fix="pass axis=0, 1 or 2 (or 'z', 'y', 'x').")
            n = self.shape[axis]
            if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= index < n:
                raise SpadkitError(f"slice index {index!r} is outside the {AXIS_NAMES[axis]} axis 0..{n - 1}", fix=f"pass an index in 0..{n - 1}.")
            box = tuple(slice(int(index), int(index) + 1) if a == axis else slice(0, m) for a, m in enumerate(self.shape))
            item = {"axis": int(axis), "index": int(index)}
            if values.ndim == 2:
                values = np.expand_dims(values, int(axis))
        expected = tuple(b.stop - b.start for b in box)
        if values.shape != expected:
            plane = tuple(m for a, m in enumerate(expected) if axis is None or a != axis)
            raise SpadkitError(f"the mask has shape {np.asarray(mask).shape}, the region needs {plane}", fix=f"pass a mask of shape {plane} (Z, Y, X order without the slice axis).")
        if values.size and (values.min() < 0 or values.max() >= self.num_classes):
            raise SpadkitError(
                f"mask values span {int(values.min())}..{int(values.max())}, outside 0..{self.num_classes - 1}",
                fix=f"use class labels 0..{self.num_classes - 1}, or start the session with num_classes={int(values.max()) + 1}.",
            )
        return item, box, values.astype(np.int32)

    def submit_correction(self, axis: int | str | None, index: int | None, mask: Any, *, region: Sequence[slice] | None = None) -> Round:
        """Save a corrected slice (or box) as a new label version, then refit and re-predict the visible region.

        Args:
            axis: 0 (z), 1 (y) or 2 (x), or None for a 3D ``mask`` of ``region``.
            index: the slice along ``axis``.
            mask: ``(Y, X)``, ``(Z, X)`` or ``(Z, Y)`` bool/integer labels of the slice; a 3D mask of the region's
                shape when ``axis`` is None. Every voxel of it counts as reviewed.
            region: the box of a 3D mask (default: the whole volume).

        Raises:
            StoreError: a read-only store (checked before anything is written).
            SpadkitError: a bad axis, index, region, mask shape, dtype or value.
        """
        self._check_writable()
        start = time.perf_counter()
        item, box, values = self._parse(axis, index, mask, region)
        key = item_key(item)
        item["split"] = self.log.splits.get(key) or split_of(len(self.log.splits) + 1)
        seen = self._prediction_of(box)
        record = {
            "op": "correction",
            "item": item,
            "parent": self._state_version,
            "annotated": [i for i in self.items if item_key(i) != key] + [item],
            "model": self.model_version,
            "voxels_changed": int((self._label[box] != values).sum()),
            "edit_dice": None if seen is None else dice(seen, values, self.num_classes),
            "changed_fraction": None if seen is None else float((seen != values).mean()),
        }
        label = self._label.copy()
        label[box] = values
        return self._commit(label, record, start, changed=box if self._state_version == self.log.latest else None)

    def _commit(self, label: np.ndarray, record: dict[str, Any], start: float, changed: Box | None = None) -> Round:
        """Save the version (with its annotated voxels) first; then update the state, refit, re-predict and measure.

        ``changed``: a box outside which ``label`` equals the current version (spares the store comparing the rest).
        """
        annotated = region_mask(record["annotated"], self.shape)
        version = self.store.save_label(
            self.case_id, LabelVolume(label, self.affine), self.label_name, author=self.author, message=encode(record), annotated=annotated, changed=changed,
            base_version=self._state_version if changed is not None else None,
        )
        t_save = time.perf_counter()
        self._label, self._state_version, self.items = label, version, record["annotated"]
        self.log = replay(self.store.label_versions(self.case_id, self.label_name))
        self._fit()
        t_fit = time.perf_counter()
        refreshed = self.predict(self.visible) if self.visible is not None else None
        t_refresh = time.perf_counter()
        validation = self.validation_dice()
        timings = {
            "save_s": t_save - start,
            "fit_s": t_fit - t_save,
            "predict_s": t_refresh - t_fit,
            "refresh_s": t_refresh - start,
            "learn_s": t_refresh - t_save,
            "validation_s": time.perf_counter() - t_refresh,
        }
        result = Round(version, record["op"], record.get("voxels_changed", 0), record.get("edit_dice"), record.get("changed_fraction"), validation, timings, refreshed)
        self._rounds.append(result.summary())
        self._write_state()
        return result

    def validation_dice(self) -> float | None:
        """Dice of the current head on the validation items (pooled voxels), None without a head or items."""
        return self._head_dice(self.head, self.features)

    def _head_dice(self, head: LightHead | None, features: VoxelFeatures) -> float | None:
        boxes = [item_box(i, self.shape) for i in self.items if i.get("split") == "validation"]
        if head is None or not boxes:
            return None
        with torch_threads(self.head_threads):
            pred = np.concatenate([predict_light_head(head, features, b).argmax(0).numpy().ravel() for b in boxes])
        return dice(pred, np.concatenate([self._label[b].ravel() for b in boxes]), self.num_classes)

    # ------------------------------------------------------------------ full learning (spadkit.active.finetune)
    def start_finetune(
        self,
        *,
        max_steps: int = 200,
        device: str | None = None,
        lr: float = finetune.LR,
        crop_tokens: int = 4,
        threads: int | None = None,
        seed: int = 0,
        score_network: bool = False,
    ) -> FinetuneJob:
        """Fine-tune backbone and decoder (a SPAD-UNETR) on the corrections so far, in a separate process.

        The child reads the corrections of the current version from the store, never from this process;
        this call returns at once. Follow it with ``job.progress()``, stop it with ``job.cancel()``, and call
        :meth:`poll_finetune` (e.g. from a GUI timer) or ``job.wait()`` to score and maybe swap it in.

        Args:
            max_steps: optimiser steps, each on 2 random crops that cross a training correction.
            device: ``"cuda"``, ``"cuda:1"``, ``"cpu"`` (default: the GPU when there is one).
            lr: AdamW learning rate (layer-wise decay as in :class:`~spadkit.tasks.finetune.SegFinetune`).
            crop_tokens: crop edge in tokens (4: 64 voxels at 1 mm; less where the image is smaller).
            threads: torch threads of the child (default: every core but one).
            seed: crops and initialisation of a new decoder.
            score_network: also measure the fine-tuned network alone (sliding window) on the validation
                items, in the child (``FinetuneResult.network_validation_dice``; costs a prediction per item).

        Raises:
            StoreError: a read-only store.
            SpadkitError: a fine-tune is running already, no training or no validation correction yet,
                a model with no SPAD-UNETR variant, a bad ``max_steps`` or ``device``.
        """
        self._check_writable()
        if self._job is not None and self._job.running:
            raise SpadkitError(f"fine-tune {self._job.id} is still running", fix="wait for it (job.wait()) or cancel it (job.cancel()) first.")
        self.poll_finetune()  # a finished job not yet scored is scored (and maybe swapped in) first
        self._job = finetune.start(self, max_steps=max_steps, device=device, lr=lr, crop_tokens=crop_tokens, threads=threads, seed=seed, score_network=score_network)
        return self._job

    def poll_finetune(self) -> FinetuneResult | None:
        """When the running fine-tune has ended: score it, swap it in if better, record it; else None.

        Returns the result once per job (None while it runs, and after its result was returned).
        """
        job = self._job
        if job is None or job.result is not None or job.running:
            return None
        info, weights = finetune.outcome(job)
        before, after, kept = self.validation_dice(), None, None
        reason = str(info.get("reason", ""))
        if weights is not None:
            model = load_saved_model(weights)
            features = VoxelFeatures.from_state_dict(torch.load(weights / finetune.worker.FEATURES, map_location="cpu", weights_only=True))
            head = self._fit_head(features)
            after = self._head_dice(head, features)
            if before is not None and after is not None and after > before:
                kept = self._adopt(model, features, head, weights)
                reason = f"validation Dice {before:.4f} -> {after:.4f}: the fine-tuned backbone is used"
            else:
                finetune.remove_weights(job.folder)
                reason = f"validation Dice {after} is not above {before}: the session keeps its model"
        result = FinetuneResult(
            accepted=kept is not None,
            validation_dice_before=before,
            validation_dice_after=after,
            seconds=float(info.get("seconds", time.perf_counter() - job.started)),
            steps=int(info.get("steps", 0)),
            weights=None if kept is None else str(kept),
            reason=reason,
            network_validation_dice=info.get("network_validation_dice"),
            job=job.id,
        )
        job.result = result
        self._finetunes.append({**dataclasses.asdict(result), "version": job.version, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self._write_state()
        return result

    def _adopt(self, model: nn.Module, features: VoxelFeatures, head: LightHead | None, weights: Path) -> Path:
        """Swap in fine-tuned weights: move them to ``models/<hash>`` and their features into the cache."""
        digest = cache.model_hash(model)
        target = self.folder / "models" / digest
        features_file = cache.feature_path(self.store, self.case_id, digest)
        features_file.parent.mkdir(parents=True, exist_ok=True)
        os.replace(weights / finetune.worker.FEATURES, features_file)
        if target.exists():  # the very same weights were adopted before
            finetune.remove_weights(weights.parent)
        else:
            os.replace(weights, target)
        self.model, self.backbone_version, self._segments = model, digest, True
        self.features, self.head, self._head_version = features, head, self._state_version
        self._shown = None
        return target

    # ------------------------------------------------------------------ undo, redo, history, suggestions
    def _restore(self, op: str, target: int, source: int) -> Round:
        self._check_writable()
        start = time.perf_counter()
        entry = decode(next(v["message"] for v in self.store.label_versions(self.case_id, self.label_name) if v["version"] == source)) if source else None
        label = self._read_version(source)
        record = {"op": op, "target": target, "parent": self._state_version, "restores": source, "annotated": (entry or {}).get("annotated", [])}
        record["voxels_changed"] = int((label != self._label).sum())
        return self._commit(label, record, start)

    def undo(self) -> Round:
        """Undo the last correction in force: a new version with the content before it (nothing is deleted).

        Raises:
            SpadkitError: nothing to undo.
        """
        if not self.log.done:
            raise SpadkitError("nothing to undo", fix="submit a correction first.")
        target = self.log.done[-1]
        return self._restore("undo", target, int(self.log.entry(target).record["parent"]))

    def redo(self) -> Round:
        """Redo the last undone correction (a new version with its content).

        Raises:
            SpadkitError: nothing to redo (a new correction clears the redo stack).
        """
        if not self.log.undone:
            raise SpadkitError("nothing to redo", fix="undo a correction first; a new correction clears the redo stack.")
        target = self.log.undone[-1]
        return self._restore("redo", target, target)

    def history(self) -> list[dict[str, Any]]:
        """Session versions oldest first: version, time, author, op, item, model, voxels changed, edit Dice,
        and the round's validation Dice and timings when recorded. Each fine-tune follows the version it
        learned from as a row with ``op="finetune"`` and its :class:`FinetuneResult` fields."""
        rounds = {r["version"]: r for r in self._rounds}
        out = []
        for entry in self.log.entries:
            row = entry.summary()
            extra = rounds.get(entry.version, {})
            row.update({k: extra[k] for k in ("validation_dice", "timings") if k in extra})
            out.append(row)
        out += [{"op": "finetune", **f} for f in self._finetunes]
        return sorted(out, key=lambda row: (row["version"], row["op"] == "finetune"))

    def suggest_next(self, top: int = 1) -> Suggestion | list[Suggestion]:
        """The slice to correct next (``top=1``) or the ``top`` best, ranked over all three axes."""
        with torch_threads(self.head_threads):
            ranked = rank_slices(self.features, self.head, self.items, top=top)
        if not ranked:
            raise SpadkitError("every slice has been corrected", fix="nothing left to suggest.")
        return ranked[0] if top == 1 else ranked

    @property
    def annotated(self) -> np.ndarray:
        """``(Z, Y, X)`` bool: the voxels a person reviewed in the current version, as the store recorded them
        (from the session record for versions saved before stores kept annotated masks)."""
        ours = any(e.version == self._state_version for e in self.log.entries)
        stored = self.store.read_annotated(self.case_id, self.label_name, self._state_version) if ours else None
        return region_mask(self.items, self.shape) if stored is None else np.asarray(stored[...], bool)

    @property
    def label(self) -> np.ndarray:
        """``(Z, Y, X)`` int32 current label (read-only view)."""
        view = self._label.view()
        view.flags.writeable = False
        return view

    def __repr__(self) -> str:
        return f"AnnotationSession({self.case_id}/{self.label_name}, {len(self.items)} items, model {self.model_version}, {math.prod(self.shape)} voxels)"
