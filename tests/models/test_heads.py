"""Pretraining heads: gradient reversal, pixel reconstruction, code and auxiliary heads."""

from __future__ import annotations

import pytest
import torch

from spadkit.models import (
    CodeHead,
    ModalityDiscriminator,
    PixelHead,
    ScaleClassifier,
    batch_level,
    reverse_gradient,
    token_grid,
)
from spadkit.models.heads import scale_bin


@pytest.mark.parametrize("strength", [1.0, 0.25, 3.0])
def test_reverse_gradient(strength):
    x = torch.randn(4, 5, requires_grad=True)
    upstream = torch.randn(4, 5)
    y = reverse_gradient(x, strength)
    torch.testing.assert_close(y, x)  # identity forward
    y.backward(upstream)
    torch.testing.assert_close(x.grad, -strength * upstream)


def test_modality_discriminator_reverses_only_into_the_features():
    torch.manual_seed(0)
    head = ModalityDiscriminator(8, 3, strength=0.5)
    pooled = torch.randn(4, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0])
    torch.nn.functional.cross_entropy(head(pooled), labels).backward()
    reversed_grad = pooled.grad.clone()
    head_grads = [p.grad.clone() for p in head.parameters()]
    # the same loss without reversal: the head gets identical gradients, the features -1/strength times them
    pooled.grad = None
    head.zero_grad()
    torch.nn.functional.cross_entropy(head.net(pooled), labels).backward()
    torch.testing.assert_close(reversed_grad, -0.5 * pooled.grad)
    for got, want in zip(head_grads, [p.grad for p in head.parameters()]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((16, 16, 16), (1.0, 1.0, 1.0)), ((4, 16, 16), (3.0, 0.75, 0.75)), ((1, 16, 16), (1.0, 1.0, 1.0)), ((32, 32, 48), (1.0, 1.0, 1.0)), ((8, 32, 16), (5.0, 1.0, 1.0))],
    ids=["iso-patch", "aniso-patch", "2d-patch", "iso-volume", "aniso-volume"],
)
def test_pixel_head_reconstructs_voxel_shape(shape, spacing):
    torch.manual_seed(0)
    head = PixelHead(12, 2)
    level = batch_level(spacing, shape[0])
    grid = token_grid(shape, level)
    tokens = torch.randn(3, grid[0] * grid[1] * grid[2], 12)
    assert head(tokens, grid, level).shape == (3, 2, *shape)


def test_pixel_head_token_order_is_c_order():
    head = PixelHead(4, 1)
    with torch.no_grad():
        head.unpatch.weight.zero_()
        head.unpatch.weight[0, 0] = 1.0  # channel 0 of a token paints its whole patch with its value
        head.unpatch.bias.zero_()
    grid = (2, 1, 3)
    tokens = torch.zeros(1, 6, 4)
    tokens[0, :, 0] = torch.arange(6.0)
    out = head(tokens, grid, 0)  # isotropic: 16^3 patches
    assert out.shape == (1, 1, 32, 16, 48)
    for i, (z, y, x) in enumerate([(z, y, x) for z in range(2) for y in range(1) for x in range(3)]):
        assert torch.all(out[0, 0, 16 * z : 16 * z + 16, 16 * y : 16 * y + 16, 16 * x : 16 * x + 16] == i)


def test_code_head_and_scale_classifier_shapes():
    tokens = torch.randn(2, 7, 16)
    assert CodeHead(16, 33)(tokens).shape == (2, 7, 33)
    assert ScaleClassifier(16, 4)(torch.randn(5, 16)).shape == (5, 4)


def test_scale_bin():
    edges = torch.tensor([64.0, 128.0, 256.0])
    assert scale_bin(torch.tensor([10.0, 64.0, 100.0, 200.0, 300.0]), edges).tolist() == [0, 0, 1, 2, 3]
