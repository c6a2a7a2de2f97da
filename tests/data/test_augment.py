"""BatchAugment: recorded, reproducible flips and intensity changes applied to image and label alike."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spadkit.data import BatchAugment, DatasetSource
from tests.data.conftest import make_stream


def _batch(b=6, c=2, shape=(5, 7, 9), position=(0, 3), seed=0) -> dict:
    """A batch whose draw key is ``(epoch, group) = position``."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand((b, c, *shape), generator=g)
    label = torch.randint(0, 3, (b, 1, *shape), generator=g)
    return {"image": image, "label": label, "stream": {"epoch": [position[0]] * b, "index": [0] * b, "group": [position[1]] * b, "step": [0] * b}}


def _clone(batch: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def test_flips_are_recorded_and_applied_to_image_and_label_alike():
    augment = BatchAugment(flip_prob=0.5, gamma_prob=0.0, intensity_prob=0.0, seed=1)
    batch = _batch(b=16)
    original = _clone(batch)
    out = augment(batch)
    flip = out["augment"]["flip"]
    assert flip.shape == (16, 3) and flip.dtype == torch.bool
    assert flip.any() and not flip.all()
    for i in range(16):
        dims = [axis + 1 for axis in range(3) if flip[i, axis]]
        want_image = original["image"][i].flip(dims) if dims else original["image"][i]
        want_label = original["label"][i].flip(dims) if dims else original["label"][i]
        assert torch.equal(out["image"][i], want_image)
        assert torch.equal(out["label"][i], want_label)


def test_only_the_allowed_axes_flip_and_a_single_slice_never_flips_z():
    always = BatchAugment(flip_prob=1.0, gamma_prob=0.0, intensity_prob=0.0)
    flat = always(_batch(shape=(1, 8, 8)))
    assert flat["augment"]["flip"].tolist() == [[False, True, True]] * 6
    only_x = BatchAugment(flip_prob=1.0, flip_axes=(2,), gamma_prob=0.0, intensity_prob=0.0)
    original = _batch()
    out = only_x(_clone(original))
    assert out["augment"]["flip"].tolist() == [[False, False, True]] * 6
    assert torch.equal(out["image"], original["image"].flip(4))


def test_parameters_depend_on_position_and_seed_only():
    augment = BatchAugment(seed=5)
    a = augment(_batch(position=(2, 7), seed=0))["augment"]
    b = augment(_batch(position=(2, 7), seed=1))["augment"]  # other voxels, same position
    c = augment(_batch(position=(2, 8)))["augment"]
    d = BatchAugment(seed=6)(_batch(position=(2, 7)))["augment"]
    e = augment(_batch(position=(3, 7)))["augment"]
    for key in ("flip", "gamma", "scale", "shift"):
        assert torch.equal(a[key], b[key]), key
    for other in (c, d, e):
        assert any(not torch.equal(a[k], other[k]) for k in ("flip", "gamma", "scale", "shift"))


def test_intensity_parameters_have_batch_by_channel_shapes_and_stay_in_range():
    augment = BatchAugment(gamma=(0.5, 2.0), gamma_prob=0.5, scale=(0.8, 1.2), shift=(-0.2, 0.1), intensity_prob=0.5, seed=3)
    params = [augment(_batch(b=8, c=3, position=(0, i)))["augment"] for i in range(20)]
    gamma = torch.cat([p["gamma"] for p in params])
    scale = torch.cat([p["scale"] for p in params])
    shift = torch.cat([p["shift"] for p in params])
    assert params[0]["gamma"].shape == params[0]["scale"].shape == params[0]["shift"].shape == (8, 3)
    assert gamma.dtype == scale.dtype == shift.dtype == torch.float32
    assert torch.all((gamma >= 0.5 - 1e-6) & (gamma <= 2.0 + 1e-6))
    assert torch.all((scale >= 0.8 - 1e-6) & (scale <= 1.2 + 1e-6))
    assert torch.all((shift >= -0.2 - 1e-6) & (shift <= 0.1 + 1e-6))
    # per sample, either all channels are changed or none (probability applies per sample)
    off = (scale == 1).all(dim=1)
    assert 0.3 < off.float().mean() < 0.7
    assert torch.all(shift[off] == 0)
    assert 0.3 < (gamma == 1).all(dim=1).float().mean() < 0.7


def test_intensity_changes_follow_the_recorded_parameters():
    augment = BatchAugment(flip_prob=0.0, gamma_prob=1.0, intensity_prob=1.0, seed=2)
    batch = _batch(b=4, c=2)
    original = batch["image"].clone()
    out = augment(batch)
    p = out["augment"]
    g = p["gamma"][..., None, None, None]
    scaled = original * p["scale"][..., None, None, None] + p["shift"][..., None, None, None]  # PUMIT's order: scale, then gamma
    lo, hi = scaled.amin(dim=(2, 3, 4), keepdim=True), scaled.amax(dim=(2, 3, 4), keepdim=True)
    want = lo + (hi - lo) * ((scaled - lo) / (hi - lo)) ** g
    torch.testing.assert_close(out["image"], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(out["label"], _batch(b=4, c=2)["label"])  # labels never change value


@pytest.mark.parametrize(
    "kwargs",
    [
        {"flip_prob": 1.5},
        {"gamma_prob": -0.1},
        {"intensity_prob": 2},
        {"gamma": (0.0, 1.5)},
        {"gamma": (1.5, 0.7)},
        {"scale": (1.2, 0.8)},
        {"shift": (0.1, -0.1)},
        {"flip_axes": (0, 3)},
    ],
)
def test_bad_ranges_raise(kwargs):
    with pytest.raises(ValueError):
        BatchAugment(**kwargs)


def test_augmenting_stream_batches(mixed_store):
    """A stream batch (with a 2D case's one-slice patches) goes through unchanged in shape."""
    stream = make_stream(mixed_store, sources=[DatasetSource(mixed_store.url, cases=["flat"], label="seg")], patch_size=16, intensity="percentile")
    batch = next(iter(stream))
    image, label = batch["image"].clone(), batch["label"].clone()
    out = BatchAugment(flip_prob=1.0, gamma_prob=0.0, intensity_prob=0.0)(batch)
    assert out["augment"]["flip"][:, 0].tolist() == [False, False]
    assert torch.equal(out["image"], image.flip(3, 4)) and torch.equal(out["label"], label.flip(3, 4))


def test_flips_keep_the_patch_affine_true_to_its_voxels():
    """After a flip, every voxel maps to the same world point as the voxel it came from."""
    b, z, y, x = 4, 3, 5, 7
    affine = torch.tensor([[0.0, 0.0, -3.0, 10.0], [0.0, -1.5, 0.0, 20.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    batch = {
        "image": torch.rand(b, 1, z, y, x),
        "affine": affine.expand(b, 4, 4).clone(),
        "origin": affine[:3, 3].expand(b, 3).clone(),
        "stream": {"epoch": [0] * b, "index": [5] * b, "group": [5] * b, "step": [0] * b},
    }
    original = batch["image"].clone()
    out = BatchAugment(flip_prob=1.0, gamma_prob=0.0, intensity_prob=0.0)(batch)
    zz, yy, xx = torch.meshgrid(torch.arange(z), torch.arange(y), torch.arange(x), indexing="ij")
    voxels = torch.stack([zz.flatten(), yy.flatten(), xx.flatten(), torch.ones(z * y * x, dtype=torch.long)]).double()  # array order
    for sample in range(b):
        world_after = (out["affine"][sample] @ voxels)[:3]
        flipped_from = [(z - 1 - zz if out["augment"]["flip"][sample, 0] else zz), (y - 1 - yy if out["augment"]["flip"][sample, 1] else yy), (x - 1 - xx if out["augment"]["flip"][sample, 2] else xx)]
        source = torch.stack([flipped_from[0].flatten(), flipped_from[1].flatten(), flipped_from[2].flatten(), torch.ones(z * y * x, dtype=torch.long)]).double()
        torch.testing.assert_close(world_after, (affine @ source)[:3])
        torch.testing.assert_close(out["image"][sample, 0], original[sample, 0][tuple(flipped_from)])
        torch.testing.assert_close(out["origin"][sample], out["affine"][sample, :3, 3])


def test_ranks_draw_different_augmentations_and_a_replay_draws_the_same(uniform_store):
    """The batch ``index`` restarts at 0 on every rank; the global draw key (epoch, group, step) does not."""
    firsts = [next(iter(make_stream(uniform_store, rank=rank, world_size=2))) for rank in (0, 1)]
    assert firsts[0]["stream"]["index"][0] == firsts[1]["stream"]["index"][0] == 0
    assert firsts[0]["stream"]["group"][0] != firsts[1]["stream"]["group"][0]
    augment = BatchAugment(flip_prob=0.5, gamma_prob=1.0, intensity_prob=1.0)
    params = [augment(batch)["augment"] for batch in firsts]
    assert not torch.equal(params[0]["scale"], params[1]["scale"])
    replay = augment(next(iter(make_stream(uniform_store, rank=0, world_size=2))))["augment"]
    for key in ("flip", "gamma", "scale", "shift"):
        assert torch.equal(replay[key], params[0][key])


# ---------------------------------------------------------------------------------- PUMIT's additions
def _ramp_batch(spacing, shape=(9, 11, 13), b=8) -> dict:
    """Patches whose voxels hold a linear function of their world position (interpolation is exact on it)."""
    affine = torch.zeros(b, 4, 4, dtype=torch.float64)
    affine[:, 3, 3] = 1
    direction = torch.tensor([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)  # array (z, y, x) -> RAS
    affine[:, :3, :3] = direction * torch.tensor(spacing, dtype=torch.float64)
    affine[:, :3, 3] = torch.tensor([4.0, -7.0, 11.0], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape), indexing="ij"))
    world = torch.einsum("bij,jzyx->bizyx", affine[:, :3, :3], grid) + affine[:, :3, 3, None, None, None]
    image = (_ramp(world)).float()[:, None]
    label = (world[:, 0] > 6).long()[:, None]
    spacing_t = torch.tensor([spacing] * b, dtype=torch.float64)
    stream = {"epoch": [0] * b, "index": [0] * b, "group": [1] * b, "step": [2] * b}
    return {"image": image, "label": label, "affine": affine, "origin": affine[:, :3, 3].clone(), "spacing": spacing_t, "stream": stream}


def _ramp(world: torch.Tensor) -> torch.Tensor:
    return 0.5 * world[:, 0] - 0.25 * world[:, 1] + 0.125 * world[:, 2]


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.2, 0.9, 0.9), (3.0, 0.8, 0.8)])
def test_rotations_resample_in_mm_and_keep_the_affine_true(spacing):
    """Every rotated voxel holds the ramp value of the world point its new affine names; tilts only
    for near-isotropic patches; labels move with the image."""
    augment = BatchAugment(flip_prob=0.0, gamma_prob=0.0, intensity_prob=0.0, rotate_prob=1.0, seed=4)
    batch = _ramp_batch(spacing)
    out = augment(batch)
    angles = out["augment"]["rotate"]
    assert torch.all(angles[:, 0].abs() <= math.pi / 2) and torch.all(angles[:, 0] != 0)
    if spacing[0] <= 1.5 * min(spacing[1:]):
        assert torch.all(angles[:, 1:].abs() <= math.pi / 6) and torch.any(angles[:, 1:] != 0)
    else:
        assert torch.all(angles[:, 1:] == 0)
    shape = out["image"].shape[2:]
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in shape), indexing="ij"))
    for i in range(len(angles)):
        affine = out["affine"][i]
        world = torch.einsum("ij,jzyx->izyx", affine[:3, :3], grid) + affine[:3, 3, None, None, None]
        # voxels sampled from inside the original patch (the corners are padding)
        source = torch.einsum("ij,jzyx->izyx", torch.linalg.inv(batch_affine(spacing))[:3, :3], world - batch_affine(spacing)[:3, 3, None, None, None])
        inside = torch.stack([(source[k] >= 0) & (source[k] <= n - 1) for k, n in enumerate(shape)]).all(dim=0)
        assert inside.float().mean() > 0.3
        torch.testing.assert_close(out["image"][i, 0][inside], _ramp(world[None])[0][inside].float(), atol=2e-3, rtol=1e-4)
        np.testing.assert_allclose(torch.linalg.norm(affine[:3, :3], dim=0).numpy(), spacing, rtol=1e-9)  # still mm per voxel
        torch.testing.assert_close(out["origin"][i], affine[:3, 3])
        nearest = torch.round(source).long()
        inner = inside & torch.stack([(nearest[k] >= 1) & (nearest[k] <= n - 2) for k, n in enumerate(shape)]).all(dim=0)
        label_world = torch.einsum("ij,jn->in", batch_affine(spacing)[:3, :3], nearest[:, inner].double()) + batch_affine(spacing)[:3, 3, None]
        assert torch.equal(out["label"][i, 0][inner], (label_world[0] > 6).long())


def batch_affine(spacing) -> torch.Tensor:
    return _ramp_batch(spacing, b=1)["affine"][0]


def test_one_slice_patches_rotate_in_plane_only():
    augment = BatchAugment(flip_prob=0.0, gamma_prob=0.0, intensity_prob=0.0, rotate_prob=1.0)
    out = augment(_ramp_batch((1.0, 1.0, 1.0), shape=(1, 12, 12)))
    assert torch.all(out["augment"]["rotate"][:, 1:] == 0) and torch.all(out["augment"]["rotate"][:, 0] != 0)
    assert torch.isfinite(out["image"]).all() and out["affine"][:, :3, 0].abs().sum() > 0


def test_clamp_contrast_and_inverted_gamma_follow_the_recorded_parameters():
    augment = BatchAugment(
        flip_prob=0.0, gamma_prob=1.0, intensity_prob=1.0, scale=(1.1, 1.3), shift=(-0.1, 0.1), clamp=(0.0, 1.0),
        contrast_prob=1.0, gamma_invert_prob=0.5, gamma_sampling="uniform", seed=8,
    )
    batch = _batch(b=16, c=1)
    original = batch["image"].clone()
    p = augment(batch)["augment"]
    x = (original * p["scale"][..., None, None, None] + p["shift"][..., None, None, None]).clamp(0, 1)
    f = p["contrast"][:, None, None, None, None]
    x = (x * f + x.mean(dim=(2, 3, 4), keepdim=True) * (1 - f)).clamp(0, 1)
    g, inv = p["gamma"][..., None, None, None], p["gamma_invert"][:, None, None, None, None]
    want = torch.where(inv, 1 - (1 - x) ** g, x**g)
    torch.testing.assert_close(batch["image"], want, atol=1e-5, rtol=1e-5)
    assert 0 < p["gamma_invert"].sum() < 16 and batch["image"].min() >= 0 and batch["image"].max() <= 1


def test_the_pumit_recipe_has_pumits_probabilities():
    augment = BatchAugment.pumit(seed=1)
    params = [augment(_batch(b=50, c=1, shape=(4, 6, 6), position=(0, i)))["augment"] for i in range(20)]

    def rate(key, test):
        return torch.cat([test(p[key]) for p in params]).float().mean().item()

    assert abs(rate("rotate", lambda v: v[:, 0] != 0) - 0.3) < 0.05
    assert abs(rate("scale", lambda v: v[:, 0] != 1) - 0.15) < 0.04
    assert rate("shift", lambda v: v[:, 0] != 0) == 0
    assert abs(rate("contrast", lambda v: v != 1) - 0.15) < 0.04
    assert abs(rate("gamma", lambda v: v[:, 0] != 1) - 0.3) < 0.05
    assert abs(rate("gamma_invert", lambda v: v) - 0.15) < 0.04
    assert abs(rate("flip", lambda v: v[:, 1]) - 0.5) < 0.05
    gamma = torch.cat([p["gamma"] for p in params])
    assert gamma.min() >= 0.7 and gamma.max() <= 1.5 and augment.clamp == (0.0, 1.0)
