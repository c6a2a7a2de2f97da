"""SpadEva: PUMIT's EVA-02 block on the SPAD-ViT trunk."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spadkit.models import SpadEva, SpadViT, create_model, save_pretrained
from spadkit.models.eva import EVA_EPS, EvaAttention


def test_eva_block_is_pumits():
    model = create_model("spad_eva_test")
    assert isinstance(model, SpadViT)
    block = model.blocks[0]
    assert block.attn.k_proj.bias is None and block.attn.q_proj.bias is None and block.attn.v_proj.bias is None
    assert block.attn.q_bias.shape == block.attn.v_bias.shape == (64,)
    assert block.mlp.w1.out_features == block.mlp.w2.out_features == int(64 * 8 / 3) == block.mlp.ffn_ln.normalized_shape[0]
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 3 + 1 and all(m.eps == EVA_EPS == 1e-5 for m in norms)
    with torch.device("meta"):  # shapes only: no 88 M parameters to initialise
        base = create_model("spad_eva_base")
    assert base.blocks[0].mlp.w1.out_features == 2048 and tuple(base.pos_embed.shape[2:]) == (5, 10, 10)
    # EVA-02-B block: 4 * 768^2 + 3 * 768 (attention) + 3 * 768 * 2048 + 2 * 2048 + 768 (SwiGLU) + 2 * 2048 + 4 * 768 (norms)
    assert sum(p.numel() for p in base.blocks[0].parameters()) == 7_092_224


@pytest.mark.parametrize(
    ("shape", "spacing", "grid"),
    [((32, 32, 32), (1.0, 1.0, 1.0), (2, 2, 2)), ((8, 32, 48), (3.0, 0.75, 0.75), (2, 2, 3)), ((1, 32, 32), (1.0, 0.5, 0.5), (1, 2, 2))],
)
def test_eva_forwards_on_every_spacing(shape, spacing, grid):
    torch.manual_seed(0)
    model = create_model("spad_eva_test").eval()
    x = torch.rand(2, 1, *shape)
    features = model.forward_features(x, spacing)
    assert features.shape == (2, 1 + grid[0] * grid[1] * grid[2], 64)
    (last,) = model.forward_intermediates(x, spacing, indices=[-1], norm=True)
    assert last.shape == (2, 64, *grid)
    torch.testing.assert_close(last.flatten(2).transpose(1, 2), features[:, 1:])


def test_q_and_v_biases_act_and_k_bias_would_be_redundant():
    """A key bias shifts every score of a query equally, which softmax ignores: EVA-02 drops it."""
    torch.manual_seed(0)
    attn = EvaAttention(32, 2).eval()
    x = torch.randn(1, 5, 32)
    before = attn(x, None, 1)
    nn.init.normal_(attn.q_bias)
    assert not torch.allclose(attn(x, None, 1), before)
    with torch.no_grad():  # a would-be k bias: add it through k_proj's input-independent part
        shifted = nn.Linear(32, 32)
        shifted.weight.copy_(attn.k_proj.weight)
        nn.init.normal_(shifted.bias)
        plain = attn(x, None, 1)
        attn.k_proj = shifted
        torch.testing.assert_close(attn(x, None, 1), plain, rtol=1e-4, atol=1e-5)


def test_eva_round_trips_through_the_registry(tmp_path):
    torch.manual_seed(1)
    model = create_model("spad_eva_test")
    save_pretrained(model, model.pretrained_cfg, tmp_path)
    again = create_model("spad_eva_test", pretrained=tmp_path)
    assert isinstance(again, SpadEva)
    x = torch.rand(1, 1, 16, 32, 32)
    torch.testing.assert_close(again.forward_features(x, (1.0, 1.0, 1.0)), model.forward_features(x, (1.0, 1.0, 1.0)))
