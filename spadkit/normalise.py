"""Intensity normalisation as the models were pretrained, applied lazily window by window.

The rule (``PretrainedCfg.intensity``, PUMIT's): per channel, clip to the 0.5 and 99.5
percentiles of the foreground ("body": voxels above the channel's minimum) and map that
window to [0, 1], or to [-1, 1] when the config says so. Stores keep these percentiles
per case (``case_attrs(case)["intensity"]``, computed chunk-wise at ingest); for a file
they are computed chunk-wise by :func:`spadkit.stats.intensity_stats`.

:class:`NormalisedArray` is a read-only ``(C, Z, Y, X)`` view over a lazy array (zarr,
dask, memory-mapped NIfTI) that scales only what is indexed, so sliding-window
inference on a 512x512x900 CT never holds the float volume in memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from spadkit.errors import SpadkitError


def percentile_windows(stats: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """``(p0.5, p99.5)`` per channel from intensity statistics, the body's where present."""
    windows = []
    for entry in stats:
        body = entry.get("body") or entry
        lo, hi = body.get("p0.5"), body.get("p99.5")
        if lo is None or hi is None:
            raise SpadkitError("intensity statistics without p0.5/p99.5", fix="re-ingest the case (spadkit ingest --overwrite) to record them.")
        windows.append((float(lo), float(hi)))
    return windows


def is_signed(model: nn.Module) -> bool:
    """Whether the model (or its backbone) was pretrained on [-1, 1] inputs (its ``pretrained_cfg.intensity``)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(getattr(model, "backbone", None), "pretrained_cfg", None)
    return cfg is not None and "[-1, 1]" in str(getattr(cfg, "intensity", ""))


class NormalisedArray:
    """A lazy ``(C, Z, Y, X)`` float32 view of ``array`` clipped and scaled per channel.

    Args:
        array: ``(C, Z, Y, X)`` array supporting basic slicing (numpy, zarr, dask, a lazy Volume's array).
        windows: ``(lo, hi)`` per channel (see :func:`percentile_windows`).
        signed: map to [-1, 1] instead of [0, 1].
    """

    def __init__(self, array: Any, windows: Sequence[tuple[float, float]], signed: bool = False):
        if len(array.shape) != 4 or len(windows) != array.shape[0]:
            raise SpadkitError(f"{len(windows)} intensity windows for an array of shape {tuple(array.shape)}", fix="pass one (lo, hi) window per channel of a (C, Z, Y, X) array.")
        self.array, self.signed = array, bool(signed)
        self.lo = np.array([w[0] for w in windows], np.float32)
        self.scale = np.array([1.0 / max(w[1] - w[0], 1e-12) for w in windows], np.float32)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.array.shape)

    @property
    def ndim(self) -> int:
        return 4

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __getitem__(self, index: tuple) -> np.ndarray:
        """Basic slicing whose first element selects channels with a ``slice`` (e.g. ``[:, z0:z1, ...]``)."""
        index = index if isinstance(index, tuple) else (index,)
        channels = index[0] if index else slice(None)
        if not isinstance(channels, slice):
            raise SpadkitError("NormalisedArray indexes channels with a slice", fix="use view[c:c + 1, ...] to keep the channel axis.")
        data = np.asarray(self.array[index], dtype=np.float32)
        lo, scale = self.lo[channels], self.scale[channels]
        data = np.clip((data - lo.reshape(-1, 1, 1, 1)) * scale.reshape(-1, 1, 1, 1), 0.0, 1.0)
        return data * 2.0 - 1.0 if self.signed else data

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        data = self[:]
        return data if dtype is None else data.astype(dtype)
