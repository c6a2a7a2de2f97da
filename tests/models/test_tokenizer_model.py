"""SPAD-VT: shapes for every spacing kind, soft quantiser, entropies and losses."""

from __future__ import annotations

import math

import pytest
import torch

from spadkit.models import PatchDiscriminator, SpadVT, create_model
from spadkit.models.tokenizer import SoftQuantizer, code_entropies, hinge_losses, tokenizer_losses

CASES = [
    ((16, 32, 32), (1.0, 1.0, 1.0), (1, 2, 2)),
    ((16, 32, 48), (3.0, 0.75, 0.75), (4, 2, 3)),
    ((8, 32, 32), (2.0, 1.0, 1.0), (1, 2, 2)),
    ((1, 32, 48), (1.0, 1.0, 1.0), (1, 2, 3)),
]
IDS = ["iso", "aniso-l2", "aniso-l1", "2d"]


@pytest.fixture(scope="module")
def tokenizer() -> SpadVT:
    torch.manual_seed(0)
    return create_model("spad_vt_test").eval()


@pytest.mark.parametrize(("shape", "spacing", "grid"), CASES, ids=IDS)
def test_reconstruction_shape_equals_input(tokenizer, shape, spacing, grid):
    x = torch.rand(2, 1, *shape)
    with torch.no_grad():
        recon, logits = tokenizer(x, torch.tensor([spacing] * 2))
        assert recon.shape == x.shape
        assert logits.shape == (2, 64, *grid)
        torch.testing.assert_close(tokenizer.encode(x, spacing), logits)


def test_token_grid_equals_vit_grid(tokenizer):
    torch.manual_seed(0)
    vit = create_model("spad_vit_test")
    for shape, spacing, grid in CASES:
        x = torch.rand(1, 1, *shape)
        with torch.no_grad():
            _, vit_grid = vit.embed(x, spacing)
        assert vit_grid == grid == tuple(tokenizer.encode(x, spacing).shape[2:])


def test_discriminator_shapes():
    torch.manual_seed(0)
    disc = PatchDiscriminator(1, channels=(4, 8, 8))
    for shape, spacing, _ in CASES:
        out = disc(torch.rand(1, 1, *shape), spacing)
        assert out.shape[:2] == (1, 1)
        assert out.shape[3:] == (shape[1] // 8, shape[2] // 8)


def test_soft_quantizer():
    torch.manual_seed(0)
    quant = SoftQuantizer(6, 5)
    z = torch.randn(2, 6, 1, 2, 3)
    z_q, logits = quant(z)
    assert z_q.shape == z.shape and logits.shape == (2, 5, 1, 2, 3)
    p = logits.softmax(1)
    torch.testing.assert_close(z_q, torch.einsum("bkzyx,kc->bczyx", p, quant.codebook))


def test_code_entropies_bounds_and_extremes():
    torch.manual_seed(0)
    k = 16
    usage, per_token = code_entropies(torch.randn(3, k, 2, 2, 2))
    assert 0 <= float(per_token) <= math.log(k) + 1e-6
    assert 0 <= float(usage) <= math.log(k) + 1e-6
    assert float(per_token) <= float(usage) + 1e-6  # mean of entropies <= entropy of the mean (concavity)
    # confident (one-hot) logits: per-token entropy ~ 0; usage log K when all codes are used equally
    codes = torch.arange(k).reshape(1, 2, 2, 4)
    one_hot = torch.nn.functional.one_hot(codes, k).permute(0, 4, 1, 2, 3).float() * 100
    usage, per_token = code_entropies(one_hot)
    assert float(per_token) == pytest.approx(0.0, abs=1e-6)
    assert float(usage) == pytest.approx(math.log(k), abs=1e-5)
    # every token on the same code: both ~ 0; uniform logits: both log K
    same = torch.zeros(2, k, 1, 2, 2)
    same[:, 3] = 100
    assert [float(v) for v in code_entropies(same)] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert [float(v) for v in code_entropies(torch.zeros(2, k, 3))] == pytest.approx([math.log(k)] * 2, abs=1e-5)


def test_tokenizer_losses():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 4, 8, 8)
    recon = x + 0.1
    logits = torch.randn(2, 8, 1, 2, 2)
    losses = tokenizer_losses(x, recon, logits, usage_weight=0.5, entropy_weight=2.0)
    assert set(losses) == {"l1", "code_usage", "token_entropy", "loss"}
    assert float(losses["l1"]) == pytest.approx(0.2, abs=1e-6)  # an error of 0.1 on [0, 1] is 0.2 on [-1, 1] (PUMIT)
    usage, per_token = code_entropies(logits)
    torch.testing.assert_close(losses["loss"], losses["l1"] - 0.5 * usage + 2.0 * per_token)

    class Perceptual(torch.nn.Module):
        def forward(self, a, b):
            return (a - b).abs().flatten(1).sum(1)

    losses = tokenizer_losses(x, recon, logits, perceptual=Perceptual(), perceptual_weight=0.5)
    assert set(losses) == {"l1", "code_usage", "token_entropy", "perceptual", "loss"}
    torch.testing.assert_close(losses["perceptual"], torch.tensor(0.2 * 64))  # per 8x8 slice on [-1, 1], mean over slices


@pytest.mark.parametrize(
    ("real", "fake", "expected"),
    [
        (1.0, -1.0, 0.0),  # confident and right: no loss
        (0.0, 0.0, 1.0),
        (-1.0, 1.0, 2.0),
        (3.0, -5.0, 0.0),  # hinge: no reward beyond the margin
        (0.5, 0.5, 0.5 * (0.5 + 1.5)),
    ],
)
def test_hinge_losses(real, fake, expected):
    assert float(hinge_losses(torch.full((2, 1, 3), real), torch.full((2, 1, 3), fake))) == pytest.approx(expected)
