"""BatchAugment: recorded, reproducible flips and intensity changes applied to image and label alike."""

from __future__ import annotations

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
    lo = original.amin(dim=(2, 3, 4), keepdim=True)
    hi = original.amax(dim=(2, 3, 4), keepdim=True)
    g = p["gamma"][..., None, None, None]
    want = (lo + (hi - lo) * ((original - lo) / (hi - lo)) ** g) * p["scale"][..., None, None, None] + p["shift"][..., None, None, None]
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
