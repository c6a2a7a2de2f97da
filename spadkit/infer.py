"""Spacing-aware sliding-window prediction with Gaussian blending, flip TTA and uncertainty.

:func:`predict` runs a segmentation model (``model(x, spacing) -> logits``,
e.g. SPAD-UNETR) over a ``(C, Z, Y, X)`` image of any spacing:

* windows are multiples of the model's patch at the image's spacing level
  (:func:`~spadkit.models.patch_shape`: 16x16x16 at 1 mm, 4x16x16 at 0.7x0.7x5 mm,
  1x16x16 in 2D), by default 6x6x6 tokens, clamped to the image;
* window positions and the Gaussian importance map are MONAI's
  (``sliding_window_inference`` with ``mode="gaussian"``, ``sigma_scale=0.125``),
  so on an in-memory volume both give the same probabilities (tested);
* the image is read window by window (numpy, zarr, dask, a lazy ``Volume``) and the
  outputs are finalised and written slab by slab along Z as soon as no later window
  touches them, so neither input nor output must fit in memory (pass zarr arrays as
  ``out``); memory is bounded by one band of windows;
* ``region`` predicts only a box (e.g. a slab of slices around the one on screen): it
  uses exactly the windows, weights and order of a full prediction that touch the
  box, so it equals the same box of a full prediction; :func:`save_prediction` layers
  it on a saved prediction, writing only the chunks the box touches;
* outputs: class probabilities, the label map (argmax) and an uncertainty map: the
  predictive entropy (nats; 0 = certain, ``log K`` = uniform), the variance over
  test-time flips, or the variance over Monte-Carlo dropout samples (dropout layers
  kept active, each window's samples seeded by its position so that a region still
  equals the same box of a full prediction).

Images must be normalised as the model was trained (``pretrained_cfg.intensity``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spadkit.errors import SpadkitError
from spadkit.models.light_head import image_and_spacing
from spadkit.models.spad import batch_level
from spadkit.models.vit import patch_shape

#: Default window in tokens per axis (96^3 voxels at 1 mm).
WINDOW_TOKENS = (6, 6, 6)
SIGMA_SCALE = 0.125


@dataclasses.dataclass
class Prediction:
    """Outputs of :func:`predict` on ``region`` (arrays cover the region, or the whole grid when given as ``out``).

    Attributes:
        probs: ``(K, z, y, x)`` float32 class probabilities.
        labels: ``(z, y, x)`` uint8/int32 argmax.
        uncertainty: ``(z, y, x)`` float32: predictive entropy in nats, or the flip / MC-dropout variance.
        region: the box predicted, as slices of the full ``(Z, Y, X)`` grid.
        windows: how many windows were run (per flip).
        uncertainty_kind: ``"entropy"``, ``"flip_variance"`` or ``"mc_dropout"`` (a variance too).
    """

    probs: Any
    labels: Any
    uncertainty: Any
    region: tuple[slice, slice, slice]
    windows: int
    uncertainty_kind: str = "entropy"


def default_window(shape: Sequence[int], spacing: Sequence[float], tokens: Sequence[int] = WINDOW_TOKENS) -> tuple[int, int, int]:
    """``tokens`` patches per axis at the spacing's level, clamped to the image rounded up to the patch."""
    patch = patch_shape(batch_level(spacing, shape[0]))
    return tuple(min(t * p, math.ceil(n / p) * p) for t, p, n in zip(tokens, patch, shape))


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window starts along one axis, as MONAI's ``dense_patch_slices`` (the last window ends at the edge)."""
    if window >= size:
        return [0]
    interval = max(int(window * (1 - overlap)), 1)
    count = next(d for d in range(math.ceil(size / interval)) if d * interval + window >= size) + 1
    return [min(i * interval, size - window) for i in range(count)]


def importance_map(window: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> torch.Tensor:
    """Gaussian weights ``(z, y, x)`` with sigma ``sigma_scale * window`` per axis, floored at 1e-3 (MONAI's)."""
    weights = None
    for n in window:
        x = torch.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=torch.float)
        g = torch.exp(x**2 / (-2 * (n * sigma_scale) ** 2))
        weights = g if weights is None else weights.unsqueeze(-1) * g
    return weights.clamp(min=max(weights.min().item(), 1e-3))


def _region(region: Sequence[slice] | None, shape: Sequence[int]) -> tuple[slice, slice, slice]:
    region = tuple(region or ())
    if len(region) > 3:
        raise SpadkitError(f"region {region} has more than 3 axes", fix="pass (z, y, x) slices, e.g. (slice(40, 48),) for a slab.")
    boxes = []
    for s, n in zip(region + (slice(None),) * (3 - len(region)), shape):
        start, stop, step = s.indices(n)
        if step != 1 or stop <= start:
            raise SpadkitError(f"region {region} is empty or strided on a grid {tuple(shape)}", fix="pass non-empty slices with step 1 inside the image.")
        boxes.append(slice(start, stop))
    return tuple(boxes)


def _flip_sets(flips: bool | Iterable[Sequence[int]], depth: int) -> list[tuple[int, ...]]:
    """Identity plus the flips (spatial axes 0=Z, 1=Y, 2=X); ``True``: every combination (Z only in 3D)."""
    if flips is True:
        axes = (0, 1, 2) if depth > 1 else (1, 2)
        return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    return [(), *(tuple(f) for f in (flips or ()) if tuple(f))]


def _read_window(array: Any, box: Sequence[slice], window: Sequence[int]) -> torch.Tensor:
    """``(C, *window)`` float32 window; beyond the image (only when the image is smaller) zero-padded at the end."""
    part = torch.as_tensor(np.asarray(array[(slice(None), *box)]), dtype=torch.float32)
    pad = [w - n for w, n in zip(window, part.shape[1:])]
    return F.pad(part, (0, pad[2], 0, pad[1], 0, pad[0])) if any(pad) else part


def _to_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes; a one-channel output is a sigmoid foreground, returned as 2 classes."""
    if logits.shape[1] == 1:
        fg = logits.sigmoid()
        return torch.cat([1 - fg, fg], dim=1)
    return logits.softmax(dim=1)


def _flip_runs(model: Callable[..., torch.Tensor], batch: torch.Tensor, spacing: torch.Tensor, flip_sets: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """Probabilities ``(B, K, z, y, x)`` of each flip of the batch, each flipped back."""
    runs = []
    for axes in flip_sets:
        dims = [2 + a for a in axes]
        runs.append((_to_probs(model(batch.flip(dims), spacing)).flip(dims) if dims else _to_probs(model(batch, spacing))).float())
    return runs


def _mc_runs(model: Callable[..., torch.Tensor], batch: torch.Tensor, spacing: torch.Tensor, flip_sets: Sequence[tuple[int, ...]], corners: Sequence[Sequence[int]], samples: int, seed: int) -> list[torch.Tensor]:
    """``samples`` stochastic passes (each over the flips), every window on its own RNG stream seeded by
    ``seed`` and its corner, so its dropout masks do not depend on which other windows share the batch."""
    per_window = []
    for window, corner in zip(batch, corners):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((seed, *corner)) & 0x7FFF_FFFF)
            per_window.append([run for _ in range(samples) for run in _flip_runs(model, window[None], spacing, flip_sets)])
    return [torch.cat(runs) for runs in zip(*per_window)]


def _averaged(runs: Sequence[torch.Tensor], variance: bool) -> torch.Tensor:
    """Mean probabilities ``(B, K, z, y, x)`` over the runs; with ``variance``, one more channel: the
    variance over the runs, averaged over classes."""
    mean = sum(runs) / len(runs)
    if not variance:
        return mean
    spread = sum((r - mean) ** 2 for r in runs) / len(runs)
    return torch.cat([mean, spread.mean(dim=1, keepdim=True)], dim=1)


def _dropout_layers(model: Any) -> list[nn.Module]:
    """The model's dropout modules with a rate above 0 (what Monte-Carlo dropout samples)."""
    if not isinstance(model, nn.Module):
        return []
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def _check_model_input(model: nn.Module, channels: int) -> None:
    expected = getattr(model, "in_chans", None)
    if expected is not None and expected != channels:
        raise SpadkitError(
            f"the model takes {expected}-channel images, this image has {channels}",
            fix=f"pass a {expected}-channel image (select or stack channels), or fine-tune a model with in_chans={channels}.",
        )


@torch.no_grad()
def predict(
    model: nn.Module | Callable[..., torch.Tensor],
    image: Any,
    spacing: Sequence[float] | None = None,
    *,
    window: Sequence[int] | None = None,
    overlap: float = 0.25,
    flips: bool | Iterable[Sequence[int]] = (),
    uncertainty: Literal["entropy", "flip_variance", "mc_dropout"] = "entropy",
    mc_samples: int = 8,
    seed: int = 0,
    region: Sequence[slice] | None = None,
    batch_size: int = 1,
    out: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Prediction:
    """Sliding-window prediction (see the module docstring).

    Args:
        model: ``model(x (B, C, z, y, x), spacing) -> (B, K, z, y, x)`` logits; switched to eval mode.
        image: ``(C, Z, Y, X)`` numpy/zarr/dask array or tensor, or a ``Volume``.
        spacing: ``(Z, Y, X)`` mm (a ``Volume``'s own when omitted).
        window: voxels ``(z, y, x)``, multiples of the patch (default :func:`default_window`).
        overlap: share of a window overlapping its neighbour, in ``[0, 1)``.
        flips: test-time flips, e.g. ``[(2,), (1,)]`` (axes 0=Z, 1=Y, 2=X), or ``True`` for all.
        uncertainty: ``"entropy"`` (predictive entropy of the blended probabilities, nats),
            ``"flip_variance"`` (variance of the probabilities over the flips, averaged over
            classes, blended like them; needs ``flips``) or ``"mc_dropout"`` (the same variance
            over ``mc_samples`` passes with the model's dropout active; needs dropout > 0, e.g.
            ``create_model("spad_unetr_small", dropout=0.1)``). The probabilities are the mean
            over all passes.
        mc_samples: stochastic passes per window for ``"mc_dropout"``.
        seed: seeds the Monte-Carlo dropout masks (with each window's position).
        region: ``(z, y, x)`` slices to predict (default: everything).
        batch_size: windows per forward pass.
        out: arrays to write into (``probs`` ``(K, Z, Y, X)``, ``labels`` and ``uncertainty``
            ``(Z, Y, X)``; full-grid shape, e.g. zarr arrays); only ``region`` is written.
            Default: new numpy arrays of the region's shape.
        device: where the model runs.
        progress: called as ``progress(done, total)`` after every batch of windows.

    Raises:
        SpadkitError: the channel count does not match the model, a bad window, region or overlap.
    """
    array, spacing = image_and_spacing(image, spacing)
    channels, shape = array.shape[0], tuple(array.shape[1:])
    _check_model_input(model, channels)
    if not 0.0 <= overlap < 1.0:
        raise SpadkitError(f"overlap must lie in [0, 1), got {overlap}", fix="use e.g. overlap=0.25 (MONAI's default) or 0.5.")
    patch = patch_shape(batch_level(spacing, shape[0]))
    window = default_window(shape, spacing) if window is None else tuple(int(w) for w in window)
    if len(window) != 3 or any(w <= 0 or w % p for w, p in zip(window, patch)):
        rounded = tuple(max(p, math.ceil(w / p) * p) for w, p in zip(window, patch))
        raise SpadkitError(f"window {window} is not a multiple of the patch {patch} at spacing {spacing}", fix=f"use window={rounded}.")
    box = _region(region, shape)
    flip_sets = _flip_sets(flips, shape[0])
    if uncertainty not in ("entropy", "flip_variance", "mc_dropout") or (uncertainty == "flip_variance" and len(flip_sets) < 2):
        raise SpadkitError(f"uncertainty={uncertainty!r} with flips={flips!r}", fix="use uncertainty='entropy', 'mc_dropout', or 'flip_variance' with flips=True (or a list of flips).")
    dropout = _dropout_layers(model) if uncertainty == "mc_dropout" else []
    if uncertainty == "mc_dropout" and (not dropout or mc_samples < 2):
        raise SpadkitError(
            f"uncertainty='mc_dropout' needs dropout layers and mc_samples >= 2 (found {len(dropout)} dropout layers, mc_samples={mc_samples})",
            fix="build the model with dropout, e.g. create_model('spad_unetr_small', dropout=0.1) (spadkit predict --mc-dropout 0.1), and mc_samples >= 2.",
        )
    variance = uncertainty != "entropy"
    starts = [window_starts(n, w, overlap) for n, w in zip(shape, window)]
    touching = [[s for s in axis if s < b.stop and s + w > b.start] for axis, b, w in zip(starts, box, window)]
    weights = importance_map(window).to(device)
    if isinstance(model, nn.Module):
        model.eval()
    for layer in dropout:
        layer.train()
    spacing_t = torch.tensor(spacing, dtype=torch.float32)
    writer = _Writer(out, box, variance)
    total = len(touching[0]) * len(touching[1]) * len(touching[2])
    done = 0
    for zi, z0 in enumerate(touching[0]):
        planes = [(z0, y0, x0) for y0 in touching[1] for x0 in touching[2]]
        for i in range(0, len(planes), batch_size):
            corners = planes[i : i + batch_size]
            batch = torch.stack([_read_window(array, [slice(c, c + w) for c, w in zip(corner, window)], window) for corner in corners]).to(device)
            runs = _mc_runs(model, batch, spacing_t, flip_sets, corners, mc_samples, seed) if dropout else _flip_runs(model, batch, spacing_t, flip_sets)
            probs = _averaged(runs, variance) * weights
            for corner, p in zip(corners, probs.cpu()):
                writer.add(p, corner, weights.cpu())
            done += len(corners)
            if progress is not None:
                progress(done, total)
        next_z = touching[0][zi + 1] if zi + 1 < len(touching[0]) else box[0].stop
        writer.flush(until=next_z)
    for layer in dropout:
        layer.eval()
    return Prediction(*writer.outputs(), region=box, windows=total, uncertainty_kind=uncertainty)


class _Writer:
    """Accumulates weighted window probabilities over a band of Z rows of the region and writes out
    rows once no later window reaches them."""

    def __init__(self, out: Mapping[str, Any] | None, box: tuple[slice, slice, slice], variance: bool = False):
        self.box, self.out, self.offset = box, out, (0, 0, 0) if out is None else tuple(b.start for b in box)
        self.variance = variance  # the last accumulated channel is the flip variance, not a class
        self.lo = box[0].start  # first row not yet written
        self.acc: torch.Tensor | None = None  # (K, rows, y, x) from row self.lo
        self.weight = torch.zeros(0, *(b.stop - b.start for b in box[1:]))

    def add(self, probs: torch.Tensor, corner: Sequence[int], weights: torch.Tensor) -> None:
        """Add one window's weighted probabilities ``(K, wz, wy, wx)`` whose first voxel is ``corner``."""
        src, dst = [], []
        for axis, (c, n, b) in enumerate(zip(corner, probs.shape[1:], self.box)):
            lo, hi = max(c, b.start), min(c + n, b.stop)
            src.append(slice(lo - c, hi - c))
            dst.append(slice(lo - (self.lo if axis == 0 else b.start), hi - (self.lo if axis == 0 else b.start)))
        if self.acc is None:
            self.acc = torch.zeros(probs.shape[0], 0, *self.weight.shape[1:])
        rows = dst[0].stop
        if rows > self.acc.shape[1]:
            grow = rows - self.acc.shape[1]
            self.acc = torch.cat([self.acc, self.acc.new_zeros(self.acc.shape[0], grow, *self.acc.shape[2:])], dim=1)
            self.weight = torch.cat([self.weight, self.weight.new_zeros(grow, *self.weight.shape[1:])], dim=0)
        self.acc[(slice(None), *dst)] += probs[(slice(None), *src)]
        self.weight[tuple(dst)] += weights[tuple(src)]

    def flush(self, until: int) -> None:
        """Normalise and write rows ``[lo, until)`` of the region (clamped to what was accumulated)."""
        if self.acc is None:
            return
        count = min(max(until, self.lo), self.lo + self.acc.shape[1]) - self.lo
        if count <= 0:
            return
        probs = (self.acc[:, :count] / self.weight[:count]).numpy()
        if self.variance:
            probs, spread = probs[:-1], probs[-1]
        else:
            spread = -(probs * np.log(np.maximum(probs, 1e-12))).sum(0)
        self._write(probs, _argmax_classes(probs), spread, self.lo)
        self.acc, self.weight = self.acc[:, count:], self.weight[count:]
        self.lo += count

    def _write(self, probs: np.ndarray, labels: np.ndarray, entropy: np.ndarray, z: int) -> None:
        if self.out is None:
            self.out = self._allocate(probs.shape[0])
        oz = z - self.box[0].start + self.offset[0]
        rows = slice(oz, oz + len(labels))
        ys, xs = (slice(o, o + b.stop - b.start) for b, o in zip(self.box[1:], self.offset[1:]))
        self.out["probs"][:, rows, ys, xs] = probs
        self.out["labels"][rows, ys, xs] = labels
        self.out["uncertainty"][rows, ys, xs] = entropy

    def _allocate(self, num_classes: int) -> dict[str, np.ndarray]:
        shape = tuple(b.stop - b.start for b in self.box)
        label_dtype = np.uint8 if num_classes <= 256 else np.int32
        return {"probs": np.zeros((num_classes, *shape), np.float32), "labels": np.zeros(shape, label_dtype), "uncertainty": np.zeros(shape, np.float32)}

    def outputs(self) -> tuple[Any, Any, Any]:
        return self.out["probs"], self.out["labels"], self.out["uncertainty"]


def _argmax_classes(probs: np.ndarray) -> np.ndarray:
    """``probs.argmax(0)`` (first maximum wins) by one pass per class: for a handful of classes
    this is several times faster than a reduction over the leading axis (torch's or numpy's)."""
    labels = np.zeros(probs.shape[1:], np.uint8 if len(probs) <= 256 else np.int32)
    best = probs[0].copy()
    for k in range(1, len(probs)):
        better = probs[k] > best
        labels[better] = k
        np.maximum(best, probs[k], out=best)
    return labels


# ---------------------------------------------------------------------- the store
def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: Label groups a prediction is saved as (the label map; the uncertainty as 0..100 % of its maximum).
PREDICTION_LABELS = ("pred", "uncertainty")


def previous_prediction(store: Any, case_id: str, base_version: int | None = None, uncertainty: str | None = None) -> dict[str, int]:
    """The saved prediction a region prediction is layered on: ``{"pred": version, "uncertainty": version}``.

    Args:
        store: an ``OMEZarrStore``.
        case_id: the case.
        base_version: a ``pred`` version (default: the latest); its partner is the ``uncertainty``
            version :func:`save_prediction` wrote with it (the same provenance message).
        uncertainty: the kind of the new prediction's uncertainty; a base of another kind is refused
            (its percentages measure something else).

    Raises:
        SpadkitError: the case has no saved prediction, no such version, a ``pred`` version without
            its ``uncertainty`` partner (saved by hand), or another uncertainty kind.
    """
    where = f"{store.url.rstrip('/')}/{case_id}/labels/pred"
    if not set(PREDICTION_LABELS) <= set(store.label_names(case_id)):
        raise SpadkitError(
            f"case {case_id} has no saved prediction for a region to refresh",
            path=where,
            fix="predict and save the whole volume once (spadkit predict without --region; save_prediction of predict(region=None)); "
            "region predictions then refresh a part of it.",
        )
    preds = {entry["version"]: entry for entry in store.label_versions(case_id, "pred")}
    version = max(preds) if base_version is None else base_version
    if version not in preds:
        raise SpadkitError(f"label 'pred' of {case_id} has no version {base_version}", path=where, fix=f"pass one of the versions {sorted(preds)}.")
    message = preds[version]["message"]
    partners = [entry["version"] for entry in store.label_versions(case_id, "uncertainty") if entry["message"] == message]
    if not partners:
        raise SpadkitError(
            f"pred version {version} of {case_id} has no uncertainty version saved with it (not written by save_prediction)",
            path=where,
            fix="predict and save the whole volume, then refresh regions of that prediction.",
        )
    kind = _provenance(message).get("uncertainty")
    if uncertainty is not None and kind not in (None, uncertainty):
        raise SpadkitError(
            f"pred version {version} of {case_id} holds {kind!r} uncertainty, the region {uncertainty!r}",
            path=where,
            fix=f"predict the region with uncertainty={kind!r}, or predict and save the whole volume.",
        )
    return {"pred": version, "uncertainty": partners[-1]}


def _provenance(message: str) -> dict[str, Any]:
    """The provenance :func:`save_prediction` records in a version message (empty for other messages)."""
    try:
        record = json.loads(message.removeprefix("prediction "))
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _region_outputs(prediction: Prediction, grid: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The label map and uncertainty of ``prediction.region`` (arrays of the region's shape, or of the
    whole grid when :func:`predict` wrote into ``out``)."""
    box = prediction.region
    shape = tuple(b.stop - b.start for b in box)
    labels, uncertainty = prediction.labels, prediction.uncertainty
    if tuple(np.shape(labels)) == grid and shape != grid:
        labels, uncertainty = labels[box], uncertainty[box]
    labels, uncertainty = np.asarray(labels), np.asarray(uncertainty)
    if labels.shape != shape or uncertainty.shape != shape:
        raise SpadkitError(
            f"prediction arrays of shape {labels.shape} match neither its region {shape} nor the grid {grid}",
            fix="save the Prediction that spadkit.infer.predict returned for this case.",
        )
    return labels, uncertainty


def save_prediction(
    store: Any,
    case_id: str,
    prediction: Prediction,
    *,
    checkpoint: str | os.PathLike | None = None,
    model_name: str = "",
    author: str = "spadkit predict",
    base_version: int | None = None,
) -> dict[str, int]:
    """Write a prediction into an ``OMEZarrStore`` as label groups ``pred`` (the label map) and
    ``uncertainty`` (as a percentage of its maximum, 0..100, since NGFF labels are integers: entropy of
    ``log K``, flip variance of 0.25, the largest variance of values in [0, 1]).

    Each becomes a new label version whose message records the provenance (model, checkpoint SHA-256);
    the store records the time and author. Returns ``{"pred": version, "uncertainty": version}``.

    A *region* prediction (``predict(..., region=...)``, e.g. the slab around the slice on screen)
    refreshes a saved one: pass ``base_version``, the ``pred`` version it is layered on (the one the
    viewer shows; :func:`previous_prediction` finds the latest). The new versions hold the region's
    prediction inside the region and the base versions' everywhere else, saved copy-on-write
    (``save_label(changed=<region>, base_version=...)``), so only the storage chunks the region
    touches are written; the provenance adds ``region`` ``[[z0, z1], [y0, y1], [x0, x1]]`` and
    ``base_versions``. If another save made a newer version meanwhile, the result is still the base
    with the region replaced (the store then compares every chunk instead of trusting the region).
    There is no implicit whole-volume fallback: a region with no saved prediction is refused.

    Raises:
        SpadkitError: a region prediction without ``base_version``, or one :func:`previous_prediction`
            refuses (no saved prediction, an unknown version, another uncertainty kind).
    """
    from spadkit.io.omezarr import now_iso
    from spadkit.volume import LabelVolume

    image = store.read_image(case_id)
    grid = tuple(image.spatial_shape)
    box = tuple(prediction.region)
    whole = [(b.start, b.stop) for b in box] == [(0, n) for n in grid]
    labels, uncertainty = _region_outputs(prediction, grid)
    provenance = {"model": model_name, "predicted": now_iso(), "windows": prediction.windows, "uncertainty": prediction.uncertainty_kind}
    if checkpoint is not None:
        provenance.update(checkpoint=str(Path(checkpoint).name), checkpoint_sha256=file_sha256(checkpoint))
    bases: dict[str, int] = {}
    if not whole:
        if base_version is None:
            raise SpadkitError(
                f"the prediction covers only {[(b.start, b.stop) for b in box]} of the grid {grid} of {case_id}",
                path=f"{store.url.rstrip('/')}/{case_id}/labels/pred",
                fix="pass base_version=<the pred version the region refreshes> (spadkit.infer.previous_prediction finds the latest), "
                "or predict the whole volume (region=None).",
            )
        bases = previous_prediction(store, case_id, base_version, prediction.uncertainty_kind)
        provenance.update(region=[[b.start, b.stop] for b in box], base_versions=bases)
    message = "prediction " + json.dumps(provenance, sort_keys=True)
    num_classes = np.shape(prediction.probs)[0]
    top = math.log(max(num_classes, 2)) if prediction.uncertainty_kind == "entropy" else 0.25
    percent = np.rint(uncertainty / top * 100).clip(0, 100).astype(np.uint8)
    versions = {}
    for name, data, classes in (("pred", labels, None), ("uncertainty", percent, {0: "certain", 100: "uniform"})):
        if not whole:  # the base version, with the region replaced
            layered = store.read_label(case_id, name, bases[name]).numpy()[0].copy()
            layered[box] = data
            data = layered
        label = LabelVolume(data, image.affine, classes=classes)
        versions[name] = store.save_label(case_id, label, name, author=author, message=message, changed=None if whole else box, base_version=bases.get(name))
    return versions
