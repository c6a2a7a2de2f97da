"""The light voxel head: cached features, masked fitting on partial labels, prediction of a region."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spadkit.errors import SpadkitError
from spadkit.models import create_model
from spadkit.models.light_head import (
    VoxelFeatures,
    _token_windows,
    extract_features,
    fit_light_head,
    intensity_features,
    predict_light_head,
)
from tests.mni_gm import dice, mni_crop


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_model("spad_vit_test")


@pytest.fixture(scope="module")
def mni():
    """A (1, 40, 56, 56) T1 crop (not a patch multiple: padding is exercised) and its gray-matter labels."""
    return mni_crop((40, 56, 56))


@pytest.fixture(scope="module")
def features(vit, mni) -> VoxelFeatures:
    return extract_features(vit, mni[0], (1.0, 1.0, 1.0), components=8)


def test_feature_shapes_on_every_grid(vit):
    for shape, spacing, patch in [((20, 40, 36), (1.0, 1.0, 1.0), (16, 16, 16)), ((6, 40, 36), (5.0, 0.7, 0.7), (4, 16, 16)), ((1, 40, 36), (1.0, 1.0, 1.0), (1, 16, 16))]:
        feats = extract_features(vit, np.random.default_rng(0).random((1, *shape), dtype=np.float32), spacing, components=None)
        assert feats.patch == patch
        assert feats.shape == shape
        assert feats.tokens.shape == (64, *(-(-n // p) for n, p in zip(shape, patch)))
        assert feats.region().shape == (64 + 4, *shape)
        assert torch.isfinite(feats.region()).all()


def test_region_matches_trilinear_upsampling_and_gather(features, mni):
    tokens = features.tokens.float()[None]
    full = F.interpolate(tokens, size=tuple(g * p for g, p in zip(tokens.shape[2:], features.patch)), mode="trilinear", align_corners=False)[0]
    full = full[:, :40, :56, :56]
    region = features.region((slice(5, 12), slice(None), slice(30, 50)))
    torch.testing.assert_close(region[:8], full[:, 5:12, :, 30:50], atol=1e-5, rtol=1e-5)
    index = torch.tensor([[0, 0, 0], [39, 55, 55], [7, 20, 33], [11, 3, 49]])
    gathered = features.gather(index)
    torch.testing.assert_close(gathered[:, :8], full[:, index[:, 0], index[:, 1], index[:, 2]].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gathered, features.region()[:, index[:, 0], index[:, 1], index[:, 2]].T)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (5.0, 0.7, 0.7)])
def test_intensity_features_do_not_depend_on_the_slab(mni, spacing):
    image = mni[0][:, :20]
    torch.testing.assert_close(intensity_features(image, spacing, slab=3), intensity_features(image, spacing, slab=64), atol=0, rtol=0)


def test_intensity_features_values():
    ramp = np.broadcast_to(np.arange(24, dtype=np.float32) * 0.5, (1, 12, 16, 24)).copy()  # 0.5 per voxel along X
    feats = intensity_features(ramp, (1.0, 1.0, 2.0)).float()  # 2 mm along X: 0.25 per mm
    torch.testing.assert_close(feats[0], torch.from_numpy(ramp[0]), atol=1e-2, rtol=1e-3)  # float16 storage
    torch.testing.assert_close(feats[1, :, :, 8:16], torch.from_numpy(ramp[0, :, :, 8:16]), atol=1e-2, rtol=1e-3)  # a blurred ramp is the ramp
    torch.testing.assert_close(feats[3, 2:-2, 2:-2, 4:-4], torch.full((8, 12, 16), 0.25), atol=1e-3, rtol=1e-3)


def test_token_windows_tile_the_grid_once():
    for grid, limit in [((13, 15, 12), 4096), ((13, 15, 12), 100), ((1, 7, 5), 4), ((3, 3, 3), 1)]:
        count = torch.zeros(grid, dtype=torch.int32)
        windows = _token_windows(grid, limit)
        for box in windows:
            count[box] += 1
            assert np.prod([b.stop - b.start for b in box]) <= limit
        assert (count == 1).all()
    assert len(_token_windows((13, 15, 12), 4096)) == 1


def test_windowed_extraction_keeps_the_grid(vit, mni):
    small = extract_features(vit, mni[0], (1.0, 1.0, 1.0), components=None, max_tokens=4)
    assert small.tokens.shape == (64, 3, 4, 4)
    assert torch.isfinite(small.tokens.float()).all()


def test_light_head_learns_gray_matter_from_two_slices(features, mni):
    labels = mni[1]
    mask = np.zeros(labels.shape, bool)
    mask[[10, 30]] = True  # two annotated axial slices
    head = fit_light_head(features, labels, mask)
    probs = predict_light_head(head, features)
    assert probs.shape == (2, *labels.shape)
    torch.testing.assert_close(probs.sum(0), torch.ones(labels.shape))
    pred = probs.argmax(0).numpy()
    assert dice(pred[~mask], labels[~mask]) > 0.8  # measured 0.93 (gray matter is nearly an intensity band)
    torch.testing.assert_close(predict_light_head(head, features, (slice(12, 20), slice(5, 9))), probs[:, 12:20, 5:9])


def test_unannotated_labels_change_nothing(features, mni):
    labels = mni[1].copy()
    mask = np.zeros(labels.shape, bool)
    mask[20, 10:40, 10:40] = True
    head = fit_light_head(features, labels, mask, max_voxels=500)
    scrambled = labels.copy()
    scrambled[~mask] = np.random.default_rng(1).integers(0, 2, int((~mask).sum()))
    same = fit_light_head(features, scrambled, mask, max_voxels=500)
    for a, b in zip(head.state_dict().values(), same.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    flipped = labels.copy()
    flipped[mask] = 1 - flipped[mask]  # the annotated voxels do matter
    other = fit_light_head(features, flipped, mask, max_voxels=500)
    assert not torch.equal(other.net[0].weight, head.net[0].weight)


def test_logistic_regression_variant(features, mni):
    mask = np.zeros(mni[1].shape, bool)
    mask[15] = True
    head = fit_light_head(features, mni[1], mask, hidden=0)
    assert isinstance(head.net, torch.nn.Linear)


def test_bad_input_names_the_fix(features, mni, vit):
    labels = mni[1]
    with pytest.raises(SpadkitError, match="annotate at least one slice"):
        fit_light_head(features, labels, np.zeros(labels.shape, bool))
    with pytest.raises(SpadkitError, match="num_classes=2"):
        fit_light_head(features, labels, np.ones(labels.shape, bool), num_classes=1)
    with pytest.raises(SpadkitError, match="feature grid"):
        fit_light_head(features, labels[:-1], np.ones(labels.shape, bool)[:-1])
    with pytest.raises(SpadkitError, match="1-channel"):
        extract_features(vit, np.zeros((2, 16, 16, 16), np.float32), (1.0, 1.0, 1.0))


def test_features_round_trip_through_a_weights_only_file(features, tmp_path):
    torch.save(features.state_dict(), tmp_path / "features.pt")
    loaded = VoxelFeatures.from_state_dict(torch.load(tmp_path / "features.pt", weights_only=True))
    assert loaded.patch == features.patch and loaded.spacing == features.spacing
    assert torch.equal(loaded.region(), features.region())


def test_features_from_a_zarr_array_equal_the_in_memory_ones(vit, mni, features, tmp_path):
    import zarr

    array = zarr.create_array(tmp_path / "img.zarr", shape=mni[0].shape, chunks=(1, 8, 56, 56), dtype="float32")
    array[:] = mni[0]
    lazy = extract_features(vit, array, (1.0, 1.0, 1.0), components=8)
    assert torch.equal(lazy.tokens, features.tokens) and torch.equal(lazy.intensity, features.intensity)
