"""Patch geometry: spacing-aware sizes, clamped windows, samplers and the inference grid."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spadkit.data import LabelSampler, PatchSize, UniformSampler, grid_windows
from spadkit.data.patches import centred_start, uniform_start, window_slices


# ---------------------------------------------------------------------------------- PatchSize
@pytest.mark.parametrize(
    ("size", "spacing", "shape", "expected"),
    [
        (PatchSize(voxels=96), (1.0, 1.0, 1.0), (200, 200, 200), (96, 96, 96)),
        (PatchSize(voxels=96), (3.0, 1.0, 1.0), (60, 200, 200), (32, 96, 96)),
        (PatchSize(voxels=96), (3.0, 0.7, 0.7), (60, 512, 512), (22, 96, 96)),  # 96 * 0.7 / 3 = 22.4
        (PatchSize(voxels=96), (0.5, 1.0, 1.0), (400, 200, 200), (96, 48, 48)),  # finest axis is Z
        (PatchSize(voxels=(32, 64, 48)), (1.0, 1.0, 1.0), (200, 200, 200), (32, 64, 48)),
        (PatchSize(voxels=96, spacing_aware=False), (3.0, 0.7, 0.7), (60, 512, 512), (96, 96, 96)),
        # a 2D image gets one slice; its (meaningless) Z spacing does not shrink the in-plane size
        (PatchSize(voxels=96), (1.0, 0.5, 0.5), (1, 50, 60), (1, 96, 96)),
        (PatchSize(voxels=96), (0.1, 0.5, 0.5), (1, 2048, 2048), (1, 96, 96)),
        (PatchSize(voxels=96, spacing_aware=False), (1.0, 0.5, 0.5), (1, 50, 60), (1, 96, 96)),
        # sizes in mm
        (PatchSize(mm=96), (3.0, 1.0, 1.0), (60, 200, 200), (32, 96, 96)),
        (PatchSize(mm=(30, 60, 60)), (3.0, 0.75, 0.75), (60, 200, 200), (10, 80, 80)),
        (PatchSize(mm=64), (1.0, 0.5, 0.5), (1, 400, 400), (1, 128, 128)),
    ],
)
def test_shape_for_follows_the_spacing(size, spacing, shape, expected):
    assert size.shape_for(spacing, shape) == expected


def test_shape_for_rounds_to_multiples_given_as_int_tuple_or_function():
    spacing, shape = (3.0, 0.7, 0.7), (60, 512, 512)
    assert PatchSize(voxels=96, multiple=8).shape_for(spacing, shape) == (24, 96, 96)  # 22.4 -> 24
    assert PatchSize(voxels=100, multiple=(1, 16, 16)).shape_for((1.0, 1.0, 1.0), (200, 200, 200)) == (100, 96, 96)
    # a multiple never rounds an edge down to zero
    assert PatchSize(voxels=3, multiple=8).shape_for((1.0, 1.0, 1.0), (200, 200, 200)) == (8, 8, 8)

    seen = []

    def stride(spacing):  # a model's stride rule: no down-sampling of Z on thick slices
        seen.append(spacing)
        return (1, 16, 16) if spacing[0] > 2 * min(spacing) else (16, 16, 16)

    size = PatchSize(voxels=96, multiple=stride)
    assert size.shape_for((3.0, 0.7, 0.7), shape) == (22, 96, 96)
    assert size.shape_for((1.0, 1.0, 1.0), (200, 200, 200)) == (96, 96, 96)
    assert PatchSize(voxels=40, multiple=stride).shape_for((1.0, 1.0, 1.0), (200, 200, 200)) == (32, 32, 32)
    assert seen == [(3.0, 0.7, 0.7), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"voxels": 96, "mm": 96},
        {"voxels": 0},
        {"voxels": -8},
        {"voxels": (96, 96)},
        {"voxels": (96, 0, 96)},
        {"mm": float("nan")},
        {"mm": float("inf")},
    ],
)
def test_bad_patch_sizes_raise(kwargs):
    with pytest.raises(ValueError):
        PatchSize(**kwargs)


def test_bad_size_message_shows_the_size():
    with pytest.raises(ValueError, match=r"positive, got 0"):
        PatchSize(voxels=0)


@pytest.mark.parametrize("multiple", [0, -16, 1.5, (16, 16), lambda spacing: (16, 0, 16)])
def test_bad_multiples_raise(multiple):
    with pytest.raises(ValueError):
        PatchSize(voxels=96, multiple=multiple).shape_for((1.0, 1.0, 1.0), (200, 200, 200))


# ---------------------------------------------------------------------------------- windows
def test_window_slices_clamp_to_the_volume():
    source, target = window_slices((-3, 5, 10), (8, 8, 8), (4, 10, 12))
    assert source == (slice(0, 4), slice(5, 10), slice(10, 12))
    assert target == (slice(3, 7), slice(0, 5), slice(0, 2))


def test_window_slices_fill_a_patch_like_explicit_indexing(rng):
    volume = rng.integers(0, 1000, size=(9, 13, 6))
    for _ in range(300):
        size = tuple(int(v) for v in rng.integers(1, 16, size=3))
        start = tuple(int(v) for v in rng.integers(-18, 16, size=3))
        source, target = window_slices(start, size, volume.shape)
        for s, t in zip(source, target):
            assert s.stop - s.start == t.stop - t.start >= 0
        patch = np.full(size, -1)
        if all(s.stop > s.start for s in source):
            patch[target] = volume[source]
        expected = np.full(size, -1)
        for idx in np.ndindex(*size):
            pos = tuple(s + i for s, i in zip(start, idx))
            if all(0 <= p < n for p, n in zip(pos, volume.shape)):
                expected[idx] = volume[pos]
        np.testing.assert_array_equal(patch, expected)


def test_uniform_start_stays_inside_and_reaches_both_ends(rng):
    shape, patch = (5, 20, 8), (5, 16, 3)
    starts = np.array([uniform_start(shape, patch, rng) for _ in range(400)])
    assert starts.min(axis=0).tolist() == [0, 0, 0]
    assert starts.max(axis=0).tolist() == [0, 4, 5]  # shape - patch: both ends are possible


def test_uniform_start_pads_a_short_axis_with_the_volume_inside(rng):
    shape, patch = (3, 40, 40), (8, 16, 16)
    starts = np.array([uniform_start(shape, patch, rng) for _ in range(300)])
    z = starts[:, 0]
    assert z.min() == -5 and z.max() == 0  # the 3 slices land anywhere inside the 8
    assert np.all(z + patch[0] >= shape[0])  # the whole short axis is inside the window


def test_centred_start_contains_the_centre_and_stays_inside(rng):
    shape, patch = (30, 50, 7), (16, 16, 16)
    for _ in range(300):
        centre = [int(rng.integers(0, n)) for n in shape]
        start = centred_start(centre, shape, patch)
        for c, s, n, p in zip(centre, start, shape, patch):
            assert s <= c < s + p
            if n >= p:
                assert 0 <= s <= n - p
    assert centred_start((15, 25, 3), shape, patch) == (7, 17, -4)  # X is 7 long: padded on both sides


# ---------------------------------------------------------------------------------- samplers
def _contains(start, patch, coords) -> bool:
    lo, hi = np.asarray(start), np.asarray(start) + np.asarray(patch)
    return bool(np.any(np.all((coords >= lo) & (coords < hi), axis=1)))


@pytest.fixture
def small_lesion():
    """Locations of a 2x2x2 class-1 blob and a single class-2 voxel in a 60x80x80 volume."""
    blob = np.argwhere(np.ones((2, 2, 2))) + np.array([50, 5, 70])
    return (60, 80, 80), {1: blob.astype(np.int32), 2: np.array([[3, 70, 4]], np.int32)}


def test_label_sampler_with_ratio_one_always_hits_foreground(small_lesion):
    shape, locations = small_lesion
    patch = (16, 16, 16)
    sampler = LabelSampler(foreground_ratio=1.0)
    rng = np.random.default_rng(1)
    starts = [sampler.start(shape, patch, rng, locations) for _ in range(200)]
    hits = [[_contains(s, patch, locations[c]) for s in starts] for c in (1, 2)]
    assert all(a or b for a, b in zip(*hits))
    assert 60 < sum(hits[0]) < 140 and 60 < sum(hits[1]) < 140  # both classes are picked
    assert all(v >= 0 and v + p <= n for s in starts for v, p, n in zip(s, patch, shape))


def test_label_sampler_only_uses_the_given_classes(small_lesion):
    shape, locations = small_lesion
    rng = np.random.default_rng(2)
    sampler = LabelSampler(foreground_ratio=1.0, classes=[2])
    assert all(_contains(sampler.start(shape, (8, 8, 8), rng, locations), (8, 8, 8), locations[2]) for _ in range(100))


def test_label_sampler_with_ratio_zero_is_uniform(small_lesion):
    shape, locations = small_lesion
    patch = (16, 16, 16)

    def hit_rate(sampler, seed):
        rng = np.random.default_rng(seed)
        starts = [sampler.start(shape, patch, rng, locations) for _ in range(3000)]
        return np.mean([_contains(s, patch, locations[1]) for s in starts]), np.mean(starts, axis=0)

    uniform_rate, _ = hit_rate(UniformSampler(), 5)
    zero_rate, zero_mean = hit_rate(LabelSampler(foreground_ratio=0.0), 6)
    half_rate, _ = hit_rate(LabelSampler(foreground_ratio=0.5), 7)
    assert uniform_rate < 0.05 and abs(zero_rate - uniform_rate) < 0.02
    np.testing.assert_allclose(zero_mean, np.subtract(shape, patch) / 2, rtol=0.1)
    assert 0.15 < half_rate < 0.35  # half of the patches go to one of two classes


def test_label_sampler_without_foreground_samples_uniformly(rng):
    sampler = LabelSampler(foreground_ratio=1.0)
    starts = np.array([sampler.start((30, 30, 30), (8, 8, 8), rng, {}) for _ in range(300)])
    assert starts.min() == 0 and starts.max() == 22
    empty_class = np.array([sampler.start((30, 30, 30), (8, 8, 8), rng, {1: np.zeros((0, 3), np.int32)}) for _ in range(300)])
    assert empty_class.min() == 0 and empty_class.max() == 22


@pytest.mark.parametrize("ratio", [-0.1, 1.01, float("nan")])
def test_label_sampler_rejects_bad_ratios(ratio):
    with pytest.raises(ValueError, match="foreground_ratio"):
        LabelSampler(foreground_ratio=ratio)


# ---------------------------------------------------------------------------------- grid
@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [
        ((37, 50, 23), (16, 16, 16), 0.5),
        ((48, 48, 48), (16, 16, 16), 0.0),
        ((10, 64, 65), (16, 32, 32), (0.0, 0.25, 0.75)),
        ((1, 50, 60), (1, 32, 32), 0.5),
    ],
)
def test_grid_covers_every_voxel_and_is_deterministic(shape, patch, overlap):
    starts = grid_windows(shape, patch, overlap)
    assert starts == grid_windows(shape, patch, overlap)
    assert starts == sorted(starts)  # C order, x fastest
    count = np.zeros(shape, dtype=np.int32)
    for start in starts:
        source, _ = window_slices(start, patch, shape)
        count[source] += 1
        for s, p, n in zip(start, patch, shape):
            if n >= p:
                assert 0 <= s <= n - p  # inside the volume
            else:
                assert s == -((p - n) // 2)  # one centred, padded window
    assert count.min() >= 1


def test_grid_steps_by_the_overlap():
    starts = grid_windows((48, 16, 20), (16, 16, 16), 0.5)
    assert sorted({s[0] for s in starts}) == [0, 8, 16, 24, 32]
    assert sorted({s[2] for s in starts}) == [0, 4]  # last window aligned to the end
    assert len(starts) == 5 * 1 * 2
    assert len(grid_windows((48, 48, 48), (16, 16, 16), 0.0)) == 27
    assert len(grid_windows((100, 100, 100), (16, 16, 16), 0.5)) == math.ceil(84 / 8 + 1) ** 3


@pytest.mark.parametrize("overlap", [1.0, -0.1, (0.5, 0.5, 1.2)])
def test_grid_rejects_bad_overlap(overlap):
    with pytest.raises(ValueError, match="overlap"):
        grid_windows((32, 32, 32), (16, 16, 16), overlap)
