"""SPAD-ViT: 3D rotary embedding, position-grid resampling, masking, intermediates."""

from __future__ import annotations

import pytest
import torch

from spadkit.models import SpadViT, batch_level, create_model, token_grid
from spadkit.models.vit import apply_rope, resample_grid, rope_tables

HEAD_DIM = 16


def _index(grid, z, y, x):
    return (z * grid[1] + y) * grid[2] + x


# --------------------------------------------------------------------------- RoPE


def test_rope_tables_shape_and_unit_rotation():
    cos, sin = rope_tables((2, 3, 4), HEAD_DIM, "cpu")
    assert cos.shape == sin.shape == (24, HEAD_DIM // 2)
    torch.testing.assert_close(cos**2 + sin**2, torch.ones_like(cos))
    torch.testing.assert_close(cos[0], torch.ones(HEAD_DIM // 2))  # origin: no rotation


def test_rope_is_relative():
    grid = (4, 5, 6)
    cos, sin = rope_tables(grid, HEAD_DIM, "cpu")
    torch.manual_seed(0)
    q, k = torch.randn(2, HEAD_DIM, dtype=torch.float64)
    n = cos.shape[0]
    rq = apply_rope(q.expand(1, 1, n, -1), cos.double(), sin.double())[0, 0]
    rk = apply_rope(k.expand(1, 1, n, -1), cos.double(), sin.double())[0, 0]

    def score(a, b):
        return float(rq[_index(grid, *a)] @ rk[_index(grid, *b)])

    offset = (1, 2, -3)
    pairs = [((0, 0, 3), (1, 2, 0)), ((2, 1, 5), (3, 3, 2)), ((1, 2, 4), (2, 4, 1))]
    scores = [score(a, b) for a, b in pairs]
    for a, b in pairs:
        assert tuple(bb - aa for aa, bb in zip(a, b)) == offset
    assert scores == pytest.approx([scores[0]] * 3, abs=1e-5)
    # another offset gives another score (the rotation carries position information)
    assert score((0, 0, 0), (0, 0, 1)) != pytest.approx(scores[0], abs=1e-3)
    # q.k without rotation is the zero-offset score
    assert score((1, 1, 1), (1, 1, 1)) == pytest.approx(float(q @ k), abs=1e-5)


def test_one_slice_grid_is_2d_rope():
    grid = (1, 3, 5)
    cos, sin = rope_tables(grid, HEAD_DIM, "cpu")
    pairs, quarter = HEAD_DIM // 2, HEAD_DIM // 4
    freq = 10000.0 ** (-2 * torch.arange(quarter, dtype=torch.float64) / pairs)
    y, x = torch.meshgrid(torch.arange(3.0, dtype=torch.float64), torch.arange(5.0, dtype=torch.float64), indexing="ij")
    angles = torch.cat([y.reshape(-1, 1) * freq, x.reshape(-1, 1) * freq], dim=1)
    torch.testing.assert_close(cos, angles.cos().float())
    torch.testing.assert_close(sin, angles.sin().float())
    # and the first slice of a deeper grid is the same table (depth angle 0 at z = 0)
    cos3, _ = rope_tables((3, 3, 5), HEAD_DIM, "cpu")
    torch.testing.assert_close(cos3[:15], cos)
    assert not torch.allclose(cos3[15:30], cos)


def test_apply_rope_preserves_norm():
    cos, sin = rope_tables((2, 2, 2), HEAD_DIM, "cpu")
    x = torch.randn(2, 3, 8, HEAD_DIM)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


# --------------------------------------------------------------------------- position grid


def test_resample_grid():
    embed = torch.randn(1, 5, 4, 4, 4)
    assert resample_grid(embed, (4, 4, 4)) is embed
    assert resample_grid(embed, [4, 4, 4]) is embed
    shrunk = resample_grid(embed, (2, 2, 1))
    assert shrunk.shape == (1, 5, 2, 2, 1)
    torch.testing.assert_close(shrunk[0, :, 0, 0, 0], embed[0, :, :2, :2, :].mean(dim=(1, 2, 3)))  # area
    assert resample_grid(embed, (8, 6, 5)).shape == (1, 5, 8, 6, 5)
    assert resample_grid(embed, (1, 8, 2)).shape == (1, 5, 1, 8, 2)  # shrink one axis, grow another
    const = torch.ones(1, 2, 4, 4, 4)
    torch.testing.assert_close(resample_grid(const, (7, 1, 9)), torch.ones(1, 2, 7, 1, 9))


# --------------------------------------------------------------------------- the backbone


@pytest.fixture(scope="module")
def vit() -> SpadViT:
    torch.manual_seed(0)
    return create_model("spad_vit_test").eval()


def test_attention_rejects_bad_head_size():
    with pytest.raises(ValueError, match="divisible by 4"):
        SpadViT(embed_dim=24, depth=1, num_heads=4)


def test_token_grid_matches_embedding(vit):
    for shape, spacing in [((32, 32, 48), (1, 1, 1)), ((8, 32, 48), (3, 0.75, 0.75)), ((16, 16, 16), (2, 1, 1)), ((1, 32, 48), (1, 1, 1))]:
        x = torch.rand(1, 1, *shape)
        _, grid = vit.embed(x, spacing)
        assert grid == token_grid(shape, batch_level(spacing, shape[0]))


def test_masked_forward_only_replaces_masked_tokens(vit):
    torch.manual_seed(1)
    x = torch.rand(2, 1, 32, 32, 32)
    spacing = torch.tensor([[1.0, 1.0, 1.0]] * 2)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [1, 5]] = True
    mask[1, [0, 2, 7]] = True
    with torch.no_grad():
        plain, grid = vit.embed(x, spacing)
        masked, _ = vit.embed(x, spacing, mask)
        assert grid == (2, 2, 2)
        keep = torch.cat([torch.ones(2, 1, dtype=torch.bool), ~mask], dim=1)
        torch.testing.assert_close(masked[keep], plain[keep])
        pos = resample_grid(vit.pos_embed, grid).flatten(2).transpose(1, 2)[0]
        for b in range(2):
            for i in mask[b].nonzero().flatten().tolist():
                torch.testing.assert_close(masked[b, 1 + i], vit.mask_token[0, 0] + pos[i])
        # an all-False mask is the unmasked forward
        torch.testing.assert_close(vit.forward_features(x, spacing, torch.zeros_like(mask)), vit.forward_features(x, spacing))
        # whatever lies under masked patches does not reach the output
        x2 = x.clone()
        x2[0, :, :16, :16, 16:] = torch.rand(16, 16, 16)  # token 1 of sample 0: (z0, y0, x1)
        torch.testing.assert_close(vit.forward_features(x2, spacing, mask), vit.forward_features(x, spacing, mask))
        assert not torch.allclose(vit.forward_features(x2, spacing), vit.forward_features(x, spacing))


def test_forward_intermediates_indices(vit):
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert len(vit.forward_intermediates(x, (1, 1, 1))) == 2
        assert len(vit.forward_intermediates(x, (1, 1, 1), 1)) == 1
        last = vit.forward_intermediates(x, (1, 1, 1), [-1], norm=True)[0]
        feats = vit.forward_features(x, (1, 1, 1))
        torch.testing.assert_close(last.flatten(2).transpose(1, 2), feats[:, 1:])
        maps = vit.forward_intermediates(x, (1, 1, 1), [1, 0, -1])  # one map per index, in the order asked
        assert len(maps) == 3
        torch.testing.assert_close(maps[0], maps[2])
        assert not torch.allclose(maps[0], maps[1])
    for bad in ([2], [-3], 3, 0, []):
        with pytest.raises(IndexError, match="out of range"):
            vit.forward_intermediates(x, (1, 1, 1), bad)


def test_forward_head_and_classes():
    torch.manual_seed(0)
    model = create_model("spad_vit_test", num_classes=3)
    x = torch.rand(2, 1, 16, 32, 32)
    assert model(x, (1, 1, 1)).shape == (2, 3)
    feats = model.forward_features(x, (1, 1, 1))
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    assert model.no_weight_decay() == {"cls_token", "mask_token", "pos_embed"}


def test_mixed_level_batch_rejected(vit):
    x = torch.rand(2, 1, 16, 32, 32)
    with pytest.raises(ValueError, match="one anisotropy level"):
        vit.forward_features(x, torch.tensor([[1.0, 1.0, 1.0], [4.0, 1.0, 1.0]]))


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((1, 1, 20, 32, 32), (1.0, 1.0, 1.0)), ((1, 1, 8, 30, 32), (1.0, 1.0, 1.0)), ((1, 1, 6, 32, 32), (3.0, 0.75, 0.75))],
)
def test_input_not_a_multiple_of_the_patch_is_refused_with_a_fix(shape, spacing):
    model = create_model("spad_vit_test")
    with pytest.raises(ValueError, match="multiples of the patch.*total_stride"):
        model(torch.rand(shape), spacing)
