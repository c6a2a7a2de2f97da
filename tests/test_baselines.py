"""spadkit.baselines: the ilastik-style filter bank is spacing-aware, and the random forest learns only what labels say."""

from __future__ import annotations

import numpy as np
import pytest

from spadkit.baselines import feature_names, filter_bank, fit_random_forest, predict_random_forest
from spadkit.errors import SpadkitError

pytest.importorskip("sklearn")


def _grid_mm(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> list[np.ndarray]:
    """Voxel-centre coordinates (mm) of a grid, centred on the grid."""
    return np.meshgrid(
        *[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij"
    )


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 1.0, 1.0), (2.0, 0.5, 0.7)])
def test_derivatives_are_per_mm(spacing):
    """On a ramp the gradient magnitude is its slope per mm, and on the bowl r^2 (mm) the Hessian
    eigenvalues are 2 and the Laplacian 6, whatever the voxel spacing."""
    shape = tuple(round(48 / s) for s in spacing)  # 48 mm: 4 sigma from the centre stays inside
    z, y, x = _grid_mm(shape, spacing)
    sigmas = (2.0, 3.0)
    names = feature_names(sigmas)
    inner = tuple(slice(n // 2 - 2, n // 2 + 2) for n in shape)
    ramp = filter_bank((0.5 * z + 0.2 * y).astype(np.float32), spacing, sigmas)
    bowl = filter_bank((z**2 + y**2 + x**2).astype(np.float32), spacing, sigmas)
    assert ramp.shape == (len(names), *shape) and ramp.dtype == np.float32
    for sigma in sigmas:
        np.testing.assert_allclose(
            ramp[names.index(f"gradient_magnitude_{sigma:g}mm")][inner],
            np.hypot(0.5, 0.2),
            rtol=0.03,
        )
        np.testing.assert_allclose(
            bowl[names.index(f"laplacian_{sigma:g}mm")][inner], 6.0, rtol=0.03
        )
        for i in (1, 2, 3):
            np.testing.assert_allclose(
                bowl[names.index(f"hessian_eig_{i}_{sigma:g}mm")][inner], 2.0, rtol=0.03
            )


def test_hessian_eigenvalues_are_sorted_and_see_a_tube():
    """A bright tube along Z: two strongly negative eigenvalues across it, one near zero along it (decreasing order)."""
    _, y, x = _grid_mm((20, 31, 31), (1.0, 1.0, 1.0))
    tube = np.exp(-(y**2 + x**2) / (2 * 2.0**2)).astype(np.float32)
    bank = filter_bank(tube, (1.0, 1.0, 1.0), (2.0,))
    e1, e2, e3 = (
        bank[feature_names((2.0,)).index(f"hessian_eig_{i}_2mm")][10, 15, 15] for i in (1, 2, 3)
    )
    assert e1 >= e2 >= e3
    assert abs(e1) < 1e-3 and e2 < -0.05 and e3 < -0.05


def test_2d_image_gets_no_depth_filtering():
    image = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    bank = filter_bank(image, (1.0, 0.5, 0.5), (1.0,))
    assert bank.shape == (7, 1, 32, 32) and np.isfinite(bank).all()
    with pytest.raises(SpadkitError, match=r"\(Z, Y, X\)"):
        filter_bank(image[0], (0.5, 0.5))


def _band_volume() -> tuple[np.ndarray, np.ndarray]:
    """A smooth random image and the label 'intensity in a middle band' (a structure a filter bank can find)."""
    from scipy import ndimage

    image = ndimage.gaussian_filter(np.random.default_rng(1).random((16, 40, 40)), 2).astype(
        np.float32
    )
    lo, hi = np.percentile(image, [40, 70])
    return image, ((image > lo) & (image < hi)).astype(np.int64)


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    return 2 * float((pred & target).sum()) / float(pred.sum() + target.sum())


def test_forest_learns_from_one_slice_and_falls_to_chance_on_shuffled_labels():
    image, labels = _band_volume()
    bank = filter_bank(image, (1.0, 1.0, 1.0), (1.0, 2.0))
    annotated = np.zeros(labels.shape, bool)
    annotated[8] = True
    rest = np.ones(labels.shape, bool)
    rest[8] = False
    forest = fit_random_forest(bank, labels, annotated, n_estimators=30, seed=0)
    good = _dice(predict_random_forest(forest, bank).argmax(0)[rest] == 1, labels[rest] == 1)
    shuffled = labels.copy()
    shuffled[annotated] = np.random.default_rng(0).permutation(labels[annotated])
    forest = fit_random_forest(bank, shuffled, annotated, n_estimators=30, seed=0)
    points = np.argwhere(rest)
    chance = _dice(predict_random_forest(forest, bank, points).argmax(1) == 1, labels[rest] == 1)
    prevalence = labels[rest].mean()
    assert good > 0.85
    assert chance < 2 * prevalence / (1 + prevalence) + 0.05  # no better than marking everything


def test_forest_reads_only_annotated_voxels_and_checks_input():
    image, labels = _band_volume()
    bank = filter_bank(image, (1.0, 1.0, 1.0), (1.0,))
    annotated = np.zeros(labels.shape, bool)
    annotated[3] = True
    garbage = labels.copy()
    garbage[~annotated] = 7  # unannotated voxels are unknown: never read
    forest = fit_random_forest(bank, garbage, annotated, n_estimators=5)
    assert list(forest.classes_) == [0, 1]
    probabilities = predict_random_forest(forest, bank, np.argwhere(annotated)[:10])
    assert probabilities.shape == (10, 2) and np.allclose(probabilities.sum(1), 1)
    with pytest.raises(SpadkitError, match="empty"):
        fit_random_forest(bank, labels, np.zeros(labels.shape, bool))
    with pytest.raises(SpadkitError, match="one \\(Z, Y, X\\) grid"):
        fit_random_forest(bank[:, :4], labels, annotated)
