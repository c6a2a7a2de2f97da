"""The baseline annotators use today: an ilastik-style random forest on a multi-scale filter bank.

ilastik's pixel classifier (Berg et al., Nature Methods 2019) fits a random forest
on a bank of smoothed-image features computed at several scales, from a few
brush strokes. :func:`filter_bank` computes that bank, spacing-aware (scales in mm,
derivatives per mm, so a 1x1x3 mm volume gets the same physical filters as an
isotropic one): per scale ``sigma`` the Gaussian smoothing, its gradient
magnitude, the Laplacian of Gaussian and the three Hessian-of-Gaussian
eigenvalues (scikit-image), plus the raw intensity. :func:`fit_random_forest`
trains scikit-learn's forest on the *annotated* voxels only (unannotated voxels
are unknown, never background) and :func:`predict_random_forest` returns class
probabilities.

Any learned model that claims to save annotation effort should beat this at
the same number of labelled voxels. Note that every feature is invariant under
mirroring: on a left-right symmetric image the forest sees the same vectors on
both sides.

Needs scikit-learn (the ``bench``/``dev`` extras, through nilearn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from spadkit.errors import SpadkitError

#: Default Gaussian scales (mm): ilastik's 0.7-10 voxel range at 1 mm, thinned to five.
SIGMAS_MM = (0.7, 1.6, 3.5, 5.0, 10.0)
#: Features per scale: Gaussian, gradient magnitude, Laplacian of Gaussian, 3 Hessian eigenvalues.
PER_SCALE = (
    "gaussian",
    "gradient_magnitude",
    "laplacian",
    "hessian_eig_1",
    "hessian_eig_2",
    "hessian_eig_3",
)


def feature_names(sigmas_mm: Sequence[float] = SIGMAS_MM) -> list[str]:
    """Names of the :func:`filter_bank` channels, in order."""
    return ["intensity"] + [f"{name}_{sigma:g}mm" for sigma in sigmas_mm for name in PER_SCALE]


def filter_bank(
    image: np.ndarray, spacing: Sequence[float], sigmas_mm: Sequence[float] = SIGMAS_MM
) -> np.ndarray:
    """ilastik-style features of one image.

    Args:
        image: ``(Z, Y, X)`` intensities (a 2D image: ``Z = 1``).
        spacing: ``(Z, Y, X)`` mm.
        sigmas_mm: Gaussian scales in mm (per axis ``sigma / spacing`` voxels; an axis of
            one voxel, as in 2D, is not filtered).

    Returns:
        ``(1 + 6 * len(sigmas_mm), Z, Y, X)`` float32, channels as :func:`feature_names`;
        derivatives are per mm (gradient magnitude in intensity/mm, Hessian in intensity/mm^2).
    """
    from skimage.feature import hessian_matrix_eigvals

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or len(spacing) != 3:
        raise SpadkitError(
            f"expected a (Z, Y, X) image with 3 spacings, got shape {image.shape} and spacing {tuple(spacing)}",
            fix="pass image[0] of a (C, Z, Y, X) volume and its spacing.",
        )
    spacing = np.asarray(spacing, dtype=np.float64)
    axes = [a for a in range(3) if image.shape[a] > 1]
    out = [image]
    for sigma in sigmas_mm:
        sigmas = [sigma / spacing[a] if a in axes else 0.0 for a in range(3)]
        gradient = [_gaussian_derivative(image, sigmas, spacing, (a,)) for a in axes]
        hessian = {
            (a, b): _gaussian_derivative(image, sigmas, spacing, (a, b))
            if a in axes and b in axes
            else np.zeros_like(image)
            for a in range(3)
            for b in range(a, 3)
        }
        out += [
            _gaussian_derivative(image, sigmas, spacing, ()),
            np.sqrt(sum(g**2 for g in gradient)),
            hessian[0, 0] + hessian[1, 1] + hessian[2, 2],
        ]
        out += list(
            hessian_matrix_eigvals([hessian[key] for key in sorted(hessian)])
        )  # (zz, zy, zx, yy, yx, xx): skimage's order
    return np.stack(out).astype(np.float32)


def _gaussian_derivative(
    image: np.ndarray, sigmas: Sequence[float], spacing: np.ndarray, axes: tuple[int, ...]
) -> np.ndarray:
    """Gaussian-smoothed ``image`` differentiated once along each of ``axes`` (per mm)."""
    order = [axes.count(a) for a in range(3)]
    scale = np.prod([spacing[a] for a in axes]) if axes else 1.0
    return ndimage.gaussian_filter(image, sigmas, order=order, mode="nearest") / np.float32(scale)


def fit_random_forest(
    features: np.ndarray,
    labels: np.ndarray,
    annotated: np.ndarray,
    *,
    n_estimators: int = 100,
    max_voxels: int = 20000,
    seed: int = 0,
    n_jobs: int | None = None,
    **forest_kwargs: Any,
):
    """A random forest on the annotated voxels (ilastik's classifier: 100 trees, Gini, balanced classes).

    Args:
        features: ``(F, Z, Y, X)`` from :func:`filter_bank`.
        labels: ``(Z, Y, X)`` integer classes; read only where ``annotated``.
        annotated: ``(Z, Y, X)`` bool, the voxels a person labelled.
        max_voxels: at most this many annotated voxels are used (a seeded random subset).
        seed: the subset and the forest's randomness.
        forest_kwargs: passed to ``sklearn.ensemble.RandomForestClassifier``.

    Returns:
        The fitted ``RandomForestClassifier``.

    Raises:
        SpadkitError: the grids differ or nothing is annotated.
    """
    from sklearn.ensemble import RandomForestClassifier

    annotated = np.asarray(annotated, bool)
    if annotated.shape != labels.shape or annotated.shape != features.shape[1:]:
        raise SpadkitError(
            f"features {features.shape[1:]}, labels {labels.shape} and annotated {annotated.shape} must share one (Z, Y, X) grid",
            fix="compute the filter bank on the image the labels belong to.",
        )
    points = np.argwhere(annotated)
    if len(points) == 0:
        raise SpadkitError(
            "the annotated mask is empty: there is nothing to learn from",
            fix="annotate at least one slice (or some voxels) first.",
        )
    rng = np.random.default_rng(seed)
    points = points[rng.choice(len(points), size=min(len(points), max_voxels), replace=False)]
    x = features[(slice(None), *points.T)].T
    y = labels[tuple(points.T)]
    forest_kwargs = {"class_weight": "balanced", "min_samples_leaf": 2, **forest_kwargs}
    return RandomForestClassifier(
        n_estimators=n_estimators, random_state=seed, n_jobs=n_jobs, **forest_kwargs
    ).fit(x, y)


def predict_random_forest(
    forest, features: np.ndarray, points: np.ndarray | None = None, chunk: int = 200_000
) -> np.ndarray:
    """Class probabilities of ``forest`` at voxels ``points`` ``(N, 3)`` -> ``(N, K)``, or of the whole grid
    -> ``(K, Z, Y, X)``; ``K`` counts classes ``0..max`` seen in training (unseen ones get probability 0)."""
    grid = features.shape[1:]
    flat = np.argwhere(np.ones(grid, bool)) if points is None else np.asarray(points)
    classes = forest.classes_.astype(int)
    out = np.zeros((len(flat), int(classes.max()) + 1), np.float32)
    for start in range(0, len(flat), chunk):
        part = flat[start : start + chunk]
        out[start : start + len(part), classes] = forest.predict_proba(
            features[(slice(None), *part.T)].T
        )
    return out if points is not None else out.T.reshape(-1, *grid)
