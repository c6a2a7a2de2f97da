"""SPAD-UNETR: one set of weights segments isotropic 3D, anisotropic 3D and 2D inputs on their own grid."""

from __future__ import annotations

import pytest
import torch

from spadkit.errors import SpadkitError
from spadkit.models import PretrainedCfg, SpadUNETR, create_model, list_models, save_pretrained
from spadkit.models.unetr import skip_indices

#: (spatial shape, spacing mm): isotropic 1 mm, anisotropic 0.7x0.7x5 mm (level 2: 4x16x16 patches), 2D
GRIDS = [((32, 32, 32), (1.0, 1.0, 1.0)), ((8, 32, 48), (5.0, 0.7, 0.7)), ((1, 48, 32), (1.0, 0.5, 0.5))]


@pytest.fixture(scope="module")
def unetr() -> SpadUNETR:
    torch.manual_seed(0)
    return create_model("spad_unetr_test", num_classes=3).eval()


def test_variants_registered():
    assert {"spad_unetr_test", "spad_unetr_small", "spad_unetr_base"} <= set(list_models("spad_unetr_*"))


def test_skip_indices_are_quarter_ends():
    assert skip_indices(12) == (2, 5, 8, 11)
    assert skip_indices(2) == (0, 0, 0, 1)


@pytest.mark.parametrize(("shape", "spacing"), GRIDS)
def test_output_grid_equals_input_grid(unetr, shape, spacing):
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        y = unetr(x, torch.tensor([spacing, spacing]))
    assert y.shape == (2, 3, *shape)
    assert torch.isfinite(y).all()
    assert y.std() > 0  # not a constant map


def test_one_set_of_weights_trains_on_every_grid():
    torch.manual_seed(1)
    model = create_model("spad_unetr_test", num_classes=2)
    for shape, spacing in GRIDS:
        model.zero_grad()
        model(torch.randn(1, 1, *shape), spacing).logsumexp(1).mean().backward()
        unused = [n for n, p in model.named_parameters() if p.grad is None]
        assert unused == ["backbone.mask_token"], unused  # the MIM mask token only; every other weight is used on every grid


def test_depth_is_restored_by_the_inverse_spacing_rule(unetr):
    """At 0.7x0.7x5 mm the embedding keeps depth 4x finer than in-plane; the decoder's depth strides undo exactly that."""
    x = torch.randn(1, 1, 4, 32, 32)
    with torch.no_grad():
        assert unetr(x, (5.0, 0.7, 0.7)).shape[2:] == (4, 32, 32)
        assert unetr(torch.randn(1, 1, 16, 32, 32), (1.0, 1.0, 1.0)).shape[2:] == (16, 32, 32)
    with pytest.raises(ValueError, match="multiples of the patch"):
        unetr(x, (1.0, 1.0, 1.0))  # isotropic needs depth multiples of 16


def test_wrong_channel_count_names_the_fix(unetr):
    with pytest.raises(SpadkitError, match="in_chans=2"):
        unetr(torch.randn(1, 2, 16, 16, 16), (1.0, 1.0, 1.0))


def test_reset_classifier(unetr):
    model = create_model("spad_unetr_test", num_classes=2)
    model.reset_classifier(5)
    assert model(torch.randn(1, 1, 1, 16, 16), (1.0, 1.0, 1.0)).shape == (1, 5, 1, 16, 16)


def test_pretrained_backbone_loads(tmp_path):
    torch.manual_seed(2)
    vit = create_model("spad_vit_test")
    save_pretrained(vit, PretrainedCfg(architecture="spad_vit_test"), tmp_path)
    model = create_model("spad_unetr_test", num_classes=2, backbone=tmp_path)
    for key, value in vit.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)


def test_pretrained_backbone_mismatch_names_the_fix(tmp_path):
    vit = create_model("spad_vit_test", in_chans=2)
    save_pretrained(vit, PretrainedCfg(architecture="spad_vit_test", in_chans=2), tmp_path / "two")
    with pytest.raises(SpadkitError, match="in_chans=2"):
        create_model("spad_unetr_test", backbone=tmp_path / "two")
    save_pretrained(vit, PretrainedCfg(architecture="spad_vit_small", in_chans=2), tmp_path / "small")
    with pytest.raises(SpadkitError, match="spad_vit_small"):
        create_model("spad_unetr_test", in_chans=2, backbone=tmp_path / "small")
