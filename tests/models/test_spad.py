"""The spacing rule (PUMIT/SPAD) and the convolutions that follow it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spadkit.models import (
    SpadConv3d,
    SpadConvTranspose3d,
    anisotropy_level,
    batch_level,
    plan_downsampling,
    total_stride,
)
from spadkit.models.spad import MAX_LEVEL, depth_halvings

INF = float("inf")
NAN = float("nan")


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("spacing", "level", "patch"),
    [
        ((1.0, 1.0, 1.0), 0, (16, 16, 16)),
        ((5.0, 1.0, 1.0), 2, (4, 16, 16)),  # r = 5
        ((3.0, 0.7, 0.7), 2, (4, 16, 16)),  # r = 4.29
        ((3.0, 0.75, 0.75), 2, (4, 16, 16)),  # r = 4 exactly
        ((2.0, 1.0, 1.0), 1, (8, 16, 16)),
        ((1.9, 1.0, 1.0), 0, (16, 16, 16)),  # r < 2 stays isotropic
        ((3.0, 0.75, 1.0), 2, (4, 16, 16)),  # the finer in-plane axis sets the ratio
        ((8.0, 1.0, 1.0), 3, (2, 16, 16)),
        ((16.0, 1.0, 1.0), 4, (1, 16, 16)),
        ((32.0, 1.0, 1.0), 5, (1, 16, 16)),
        ((100.0, 1.0, 1.0), 5, (1, 16, 16)),  # ratio clipped at 32
        ((0.5, 1.0, 1.0), 0, (16, 16, 16)),  # in-plane coarser than depth: ratio clipped at 1
        ((1.0, 4.0, 4.0), 0, (16, 16, 16)),
    ],
)
def test_spacing_rule(spacing, level, patch):
    assert anisotropy_level(spacing) == level
    assert plan_downsampling(spacing) == (patch,)
    assert total_stride(spacing) == patch
    assert patch[0] == max(16 >> level, 1)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.75, 0.75), (INF, 0.5, 0.5)])
def test_2d_gets_top_level(spacing):
    assert anisotropy_level(spacing, is_2d=True) == MAX_LEVEL == 5
    assert plan_downsampling(spacing, is_2d=True) == ((1, 16, 16),)
    assert anisotropy_level((INF, 0.8, 0.8)) == 5  # infinitely coarse depth
    assert total_stride((INF, 1.0, 1.0)) == (1, 16, 16)


def test_depth_halved_only_after_first_d_inplane_halvings():
    assert plan_downsampling((3, 0.75, 0.75), (2, 1, 1)) == ((1, 4, 4), (2, 2, 2), (2, 2, 2))
    assert plan_downsampling((1, 1, 1), (2, 1, 1)) == ((4, 4, 4), (2, 2, 2), (2, 2, 2))
    assert plan_downsampling((2, 1, 1), (2, 1, 1)) == ((2, 4, 4), (2, 2, 2), (2, 2, 2))
    assert plan_downsampling((8, 1, 1), (2, 1, 1)) == ((1, 4, 4), (1, 2, 2), (2, 2, 2))
    assert plan_downsampling((1, 1, 1), (2, 1, 1), is_2d=True) == ((1, 4, 4), (1, 2, 2), (1, 2, 2))
    assert plan_downsampling((3, 0.75, 0.75), (0, 4)) == ((1, 1, 1), (4, 16, 16))
    assert total_stride((3, 0.75, 0.75), (2, 1, 1)) == (4, 16, 16)
    # the staged plan and the single patchify stage agree on the total stride at every level
    for ratio in (1, 2, 4, 8, 16, 32):
        assert total_stride((ratio, 1, 1), (2, 1, 1)) == total_stride((ratio, 1, 1), (4,))


def test_depth_halvings():
    assert depth_halvings(0, 4, 0) == 4
    assert depth_halvings(0, 4, 2) == 2
    assert depth_halvings(2, 1, 2) == 1
    assert depth_halvings(0, 2, 3) == 0
    assert depth_halvings(3, 1, 5) == 0


@pytest.mark.parametrize(
    "spacing",
    [(0.0, 1.0, 1.0), (-1.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, -0.5), (NAN, 1.0, 1.0), (1.0, NAN, 1.0), (-INF, 1.0, 1.0), (1.0, INF, 1.0)],
)
def test_bad_spacing_raises(spacing):
    with pytest.raises(ValueError, match="spacing"):
        anisotropy_level(spacing)


def test_bad_stage_halvings_raise():
    with pytest.raises(ValueError, match="halvings"):
        plan_downsampling((1, 1, 1), (2, -1))


def test_batch_level():
    assert batch_level((3.0, 0.75, 0.75), depth=8) == 2
    assert batch_level(torch.tensor([[3.0, 0.75, 0.75], [5.0, 1.0, 1.0]]), depth=8) == 2
    assert batch_level(torch.tensor([[1.0, 1.0, 1.0], [3.0, 0.75, 0.75]]), depth=1) == 5  # 2D: spacing irrelevant
    with pytest.raises(ValueError, match="one anisotropy level"):
        batch_level(torch.tensor([[1.0, 1.0, 1.0], [3.0, 0.75, 0.75]]), depth=16)


# --------------------------------------------------------------------------- SpadConv3d


def _conv(cin=2, cout=3, kernel=16, stride=16, level=0, seed=0) -> SpadConv3d:
    torch.manual_seed(seed)
    conv = SpadConv3d(cin, cout, kernel, stride, level=level).double()
    with torch.no_grad():
        conv.bias.normal_()
    return conv


def test_patchify_on_2d_equals_conv2d_with_depth_summed_kernel():
    conv = _conv()
    x = torch.randn(2, 2, 1, 32, 48, dtype=torch.float64)
    out = conv(x, batch_level((1.0, 1.0, 1.0), depth=1))
    expected = F.conv2d(x[:, :, 0], conv.weight.sum(dim=2), conv.bias, stride=16)
    assert out.shape == (2, 3, 1, 2, 3)
    torch.testing.assert_close(out[:, :, 0], expected)


def test_patchify_on_isotropic_equals_plain_conv3d():
    conv = _conv()
    plain = nn.Conv3d(2, 3, 16, 16).double()
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(1, 2, 32, 32, 16, dtype=torch.float64)
    torch.testing.assert_close(conv(x, 0), plain(x))
    torch.testing.assert_close(conv(x, 0), nn.Conv3d.forward(conv, x))


def test_patchify_at_level_2_uses_depth_stride_4_and_group_summed_kernel():
    conv = _conv()
    x = torch.randn(1, 2, 8, 32, 32, dtype=torch.float64)
    level = batch_level((3.0, 0.75, 0.75), depth=8)
    out = conv(x, level)
    assert out.shape == (1, 3, 2, 2, 2)  # depth patch 4, in-plane 16
    w = conv.weight
    group_sum = torch.stack([w[:, :, 4 * g : 4 * g + 4].sum(dim=2) for g in range(4)], dim=2)
    assert group_sum.shape == (3, 2, 4, 16, 16)
    torch.testing.assert_close(out, F.conv3d(x, group_sum, conv.bias, stride=(4, 16, 16)))
    # physical meaning: an isotropic volume constant over each 4-slice slab gives, with the full
    # 16-tap kernel, what the thick-slice volume gives with the group-summed kernel
    thick = torch.randn(1, 2, 4, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(conv(thick.repeat_interleave(4, dim=2), 0), conv(thick, level))


@pytest.mark.parametrize(("level", "depth_stride"), [(1, 8), (2, 4), (3, 2), (4, 1), (5, 1)])
def test_patchify_depth_stride_per_level(level, depth_stride):
    conv = _conv()
    x = torch.randn(1, 2, 16, 16, 16, dtype=torch.float64)
    assert conv(x, level).shape == (1, 3, 16 // depth_stride, 1, 1)


def test_patchify_inside_a_network_follows_its_level():
    conv = _conv(kernel=2, stride=2, level=2)  # input already halved twice in-plane
    x = torch.randn(1, 2, 8, 8, 8, dtype=torch.float64)
    assert conv(x, 2).shape == (1, 3, 4, 4, 4)  # level >= d: depth halved too
    assert conv(x, 3).shape == (1, 3, 8, 4, 4)  # depth still coarser: kernel summed to 1 tap
    torch.testing.assert_close(conv(x, 3), F.conv3d(x, conv.weight.sum(2, keepdim=True), conv.bias, stride=(1, 2, 2)))


@pytest.mark.parametrize("stride", [1, 2])
def test_3x3x3_acts_as_depth_summed_1x3x3_below_the_level(stride):
    conv = _conv(kernel=3, stride=stride, level=1)
    x = torch.randn(1, 2, 4, 8, 8, dtype=torch.float64)
    out = conv(x, 2)  # level 1 < d = 2
    expected = F.conv3d(x, conv.weight.sum(dim=2, keepdim=True), conv.bias, stride=(1, stride, stride), padding=(0, 1, 1))
    assert out.shape == (1, 3, 4, 8 // stride, 8 // stride)
    torch.testing.assert_close(out, expected)
    # on one slice the 1x3x3 conv is a conv2d with the summed kernel
    x2d = torch.randn(1, 2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(
        conv(x2d, 5)[:, :, 0], F.conv2d(x2d[:, :, 0], conv.weight.sum(dim=2), conv.bias, stride=stride, padding=1)
    )
    # at or above the level it is the plain 3x3x3 convolution
    torch.testing.assert_close(conv(x, 1), nn.Conv3d.forward(conv, x))
    torch.testing.assert_close(conv(x, 0), nn.Conv3d.forward(conv, x))


@pytest.mark.parametrize(("kernel", "stride"), [(3, 3), (5, 1), (6, 6), (4, 2), (1, 1), (3, 4)])
def test_invalid_kernel_or_stride_raises(kernel, stride):
    with pytest.raises(ValueError, match="SpadConv3d supports"):
        SpadConv3d(1, 1, kernel, stride)


@pytest.mark.parametrize("stride", [1, 3, 6])
def test_invalid_transpose_stride_raises(stride):
    with pytest.raises(ValueError, match="power-of-2"):
        SpadConvTranspose3d(1, 1, stride, level=4)


# --------------------------------------------------------------------------- SpadConvTranspose3d


@pytest.mark.parametrize(
    ("spacing", "shape"),
    [((1.0, 1.0, 1.0), (32, 32, 48)), ((3.0, 0.75, 0.75), (8, 32, 48)), ((1.0, 1.0, 1.0), (1, 32, 48))],
    ids=["level0", "level2", "2d"],
)
@pytest.mark.parametrize(("stride", "level"), [(16, 0), (4, 0), (2, 2), (2, 3)])
def test_transpose_undoes_conv_shape(spacing, shape, stride, level):
    d = batch_level(spacing, shape[0])
    # bring the input to the conv's level first (as the network would)
    pre = _conv(1, 4, 2**level, 2**level) if level else None
    x = torch.randn(1, 1, *shape, dtype=torch.float64)
    h = pre(x, d) if pre is not None else x
    down = _conv(h.shape[1], 4, stride, stride, level=level)
    up = SpadConvTranspose3d(4, h.shape[1], stride, level=level + int(math.log2(stride))).double()
    y = down(h, d)
    assert up(y, d).shape == h.shape


def test_transpose_kernel_is_depth_averaged_on_2d():
    torch.manual_seed(0)
    up = SpadConvTranspose3d(3, 2, 16, level=4).double()
    y = torch.randn(1, 3, 1, 2, 2, dtype=torch.float64)
    out = up(y, 5)
    assert out.shape == (1, 2, 1, 32, 32)
    expected = F.conv_transpose2d(y[:, :, 0], up.weight.mean(dim=2), up.bias, stride=16)
    torch.testing.assert_close(out[:, :, 0], expected)
    # a 2D output keeps the scale of the 3D one: its voxel is the mean over the thin slices it covers
    thick = up(y, 5)[:, :, 0]
    thin = nn.ConvTranspose3d.forward(up, y)  # (1, 2, 16, 32, 32) from the same tokens, full 3D kernel
    torch.testing.assert_close(thick - up.bias.view(1, -1, 1, 1), (thin - up.bias.view(1, -1, 1, 1, 1)).mean(dim=2))
    # isotropic: the plain transposed conv
    y3 = torch.randn(1, 3, 2, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(up(y3, 0), nn.ConvTranspose3d.forward(up, y3))
