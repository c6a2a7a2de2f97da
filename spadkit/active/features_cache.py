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

#: Default extraction settings of the session (token PCA components, tokens per backbone forward).
COMPONENTS = 32
MAX_TOKENS = 4096


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

    Uses the store's foreground ("body") 0.5/99.5 percentiles of each channel (all-voxel ones for
    old stores): clip, then map to [0, 1], or to [-1, 1] when ``pretrained_cfg.intensity`` says so.
    """
    image = store.read_image(case_id)
    stats = store.case_attrs(case_id).get("intensity") or []
    data = image.numpy().astype(np.float32)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(getattr(model, "backbone", None), "pretrained_cfg", None)
    signed = cfg is not None and "[-1, 1]" in str(getattr(cfg, "intensity", ""))
    for c in range(data.shape[0]):
        entry = stats[c] if c < len(stats) else {}
        body = entry.get("body") or entry
        lo, hi = body.get("p0.5"), body.get("p99.5")
        if lo is None or hi is None:
            lo, hi = np.percentile(data[c], [0.5, 99.5])
        data[c] = np.clip((data[c] - lo) / max(float(hi) - float(lo), 1e-12), 0.0, 1.0)
    if signed:
        data = data * 2.0 - 1.0
    return data, tuple(float(s) for s in image.spacing)


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
