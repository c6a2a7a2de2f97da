"""Do the auxiliary pretraining tasks exist on this data?

The scale head classifies a crop's physical in-plane extent; if every crop falls
in one bin it learns a constant and adds nothing. The modality head (behind
gradient reversal) makes features modality-invariant; with one modality, or when
the modality is the same thing as the dimensionality (the only CT is the only 2D
image), it can only learn to tell 2D from 3D, which the tokens already say.
:class:`~spadkit.tasks.MIMPretrain` switches such heads off at ``setup`` and logs why.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spadkit.data.sources import CaseInfo


def crop_extents_mm(cases: Sequence[CaseInfo], patch_shapes: Sequence[Sequence[int]], zoom: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """``(cases, 2)`` smallest and largest in-plane crop extent (mm) each case can give.

    The extent is ``min(Y, X)`` of patch voxels times spacing (as the scale head's label);
    ``zoom``: the range of the crop's in-plane zoom factor (1 without zoom augmentation).
    """
    extents = np.array([min(s * n for s, n in zip(case.spacing[1:], shape[1:])) for case, shape in zip(cases, patch_shapes)], dtype=float)
    return np.stack([extents * min(zoom), extents * max(zoom)], axis=1)


def scale_task_reason(extents_mm: np.ndarray, edges_mm: Sequence[float]) -> str | None:
    """``None`` if crops span at least two scale bins, else why the scale head is off."""
    bins = set(np.searchsorted(np.asarray(edges_mm, dtype=float), extents_mm.ravel(), side="left").tolist())
    if len(bins) >= 2:
        return None
    lo, hi = float(extents_mm.min()), float(extents_mm.max())
    return f"scale head off: every crop's in-plane extent ({lo:.0f}-{hi:.0f} mm) falls in one bin of edges {list(edges_mm)} mm, so there is no scale to classify"


def modality_task_reason(cases: Sequence[CaseInfo], modalities: Sequence[str]) -> str | None:
    """``None`` if some dimensionality (2D or 3D) holds two of ``modalities``, else why the head is off."""
    known = {m.upper() for m in modalities}
    by_kind: dict[str, set[str]] = {"2D": set(), "3D": set()}
    for case in cases:
        if case.modality and case.modality.upper() in known:
            by_kind["2D" if case.spatial_shape[0] == 1 else "3D"].add(case.modality.upper())
    if any(len(found) >= 2 for found in by_kind.values()):
        return None
    seen = {kind: sorted(found) for kind, found in by_kind.items() if found}
    if len(set().union(*by_kind.values())) < 2:
        return f"modality head off: the data has fewer than two of the modalities {sorted(known)} ({seen or 'none'})"
    return f"modality head off: modality is confounded with dimensionality ({seen}), so the head could only tell 2D from 3D"
