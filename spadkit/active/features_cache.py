"""Backbone features of a case, computed once per (case, model) and cached beside the store.

Layout (inside the store's non-Zarr ``.spadkit/`` folder)::

    STORE/.spadkit/features/<case>/<model hash>-<image key>.pt   VoxelFeatures state dict (torch.save)
    STORE/.spadkit/sessions/<case>/<label>/session.json           model hash, rounds (quality signals)
    STORE/.spadkit/sessions/<case>/<label>/models/<hash>/         the model (save_pretrained), for resume

The model hash covers the architecture and every parameter and buffer; the image
key covers the case's write time and shape, so re-ingesting a case or changing
weights never reuses stale features. A deleted or unreadable cache file is
recomputed (and rewritten) on the next start; it is derived data, nothing is lost.
Files are written through :func:`spadkit.atomic.atomic_path`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spadkit.atomic import atomic_path
from spadkit.errors import SpadkitError
from spadkit.models.light_head import VoxelFeatures, extract_features
from spadkit.normalise import NormalisedArray, is_signed, percentile_windows

#: Default extraction settings of the session (token PCA components, tokens per backbone forward).
COMPONENTS = 32
MAX_TOKENS = 4096
#: Z slices normalised at a time by :func:`normalised_image`.
_SLAB = 32


def model_hash(model: nn.Module) -> str:
    """16 hex digits of SHA-256 over the class name and every tensor of the state dict (names, shapes, bytes)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def local_root(store: Any) -> Path:
    """The store's local folder (sessions keep their files there).

    Raises:
        SpadkitError: a remote store (``s3://...``): sessions need a local store.
    """
    url = str(store.url)
    if "://" in url and not url.startswith("file://"):
        raise SpadkitError("annotation sessions need a local store", path=url, fix="copy the store to a local disk first.")
    return Path(url.removeprefix("file://"))


def session_dir(store: Any, case_id: str, label_name: str) -> Path:
    return local_root(store) / ".spadkit" / "sessions" / case_id / label_name


def image_key(store: Any, case_id: str) -> str:
    attrs = store.case_attrs(case_id)
    return hashlib.sha256(json.dumps([attrs.get("written"), attrs.get("shape_czyx")]).encode()).hexdigest()[:12]


def feature_path(store: Any, case_id: str, model_digest: str) -> Path:
    return local_root(store) / ".spadkit" / "features" / case_id / f"{model_digest}-{image_key(store, case_id)}.pt"


def normalised_image(store: Any, case_id: str, model: nn.Module) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The case image ``(C, Z, Y, X)`` float32 scaled as the model was pretrained, and its spacing (mm).

    The rule of :mod:`spadkit.normalise` with the store's foreground ("body") 0.5/99.5 percentiles
    of each channel; a channel without recorded statistics (a case written by ``write_case``
    without ``attrs``, an old store) uses the 0.5/99.5 percentiles of all its voxels.
    """
    image = store.read_image(case_id)
    raw = image.numpy()
    stats = store.case_attrs(case_id).get("intensity") or []
    windows = [_window(stats[c] if c < len(stats) else {}, raw[c]) for c in range(raw.shape[0])]
    view = NormalisedArray(raw, windows, signed=is_signed(model))
    data = np.empty(view.shape, np.float32)
    # Slab by slab: the peak memory is one float copy of the image, not three.
    for z in range(0, data.shape[1], _SLAB):
        data[:, z : z + _SLAB] = view[:, z : z + _SLAB]
    return data, tuple(float(s) for s in image.spacing)


def _window(entry: dict[str, Any], channel: np.ndarray) -> tuple[float, float]:
    """``(p0.5, p99.5)`` of one channel: its recorded statistics, else computed from ``channel`` ``(Z, Y, X)``."""
    try:
        return percentile_windows([entry])[0]
    except SpadkitError:  # no statistics recorded for this channel
        lo, hi = np.percentile(channel, [0.5, 99.5])
        return float(lo), float(hi)


def load_or_extract(store: Any, case_id: str, model: nn.Module, image: np.ndarray, spacing: tuple[float, float, float], digest: str) -> tuple[VoxelFeatures, bool]:
    """The cached features of the case, or extract and cache them. Returns ``(features, from_cache)``.

    An unreadable cache file (truncated, from another torch) is recomputed with a warning. A store
    opened read-only (``mode="r"``) gets nothing written: its features stay in memory.
    """
    path = feature_path(store, case_id, digest)
    if path.is_file():
        try:
            return VoxelFeatures.from_state_dict(torch.load(path, map_location="cpu", weights_only=True)), True
        except Exception as error:
            warnings.warn(f"{path}: unreadable feature cache ({type(error).__name__}); recomputing it", stacklevel=3)
    features = extract_features(model, image, spacing, components=COMPONENTS, max_tokens=MAX_TOKENS)
    if store.mode == "r":
        return features, False
    try:
        with atomic_path(path) as tmp:
            torch.save(features.state_dict(), tmp)
    except OSError as error:  # a read-only store folder: keep the features in memory only
        warnings.warn(f"{path}: cannot cache features ({error}); they will be recomputed next time", stacklevel=3)
    return features, False
