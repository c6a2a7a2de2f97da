"""SpadClassifier: pooled tokens, linear/MLP heads, timm's reset_classifier, on 3D, anisotropic and 2D inputs."""

from __future__ import annotations

import pytest
import torch

from spadkit.errors import SpadkitError
from spadkit.models import SpadClassifier, create_model, list_models

GRIDS = [((16, 32, 32), (1.0, 1.0, 1.0)), ((4, 32, 32), (5.0, 0.7, 0.7)), ((1, 32, 32), (1.0, 0.5, 0.5))]


def test_variants_registered():
    assert list_models("spad_cls_*") == ["spad_cls_base", "spad_cls_small", "spad_cls_test"]


@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize("pool", ["avg", "token", "avgtoken"])
def test_one_set_of_weights_classifies_every_grid(pool, head):
    torch.manual_seed(0)
    model = create_model("spad_cls_test", num_classes=4, pool=pool, head=head).eval()
    for shape, spacing in GRIDS:
        with torch.no_grad():
            logits = model(torch.randn(3, 1, *shape), spacing)
        assert logits.shape == (3, 4)
        assert torch.isfinite(logits).all()
        assert (logits[0] != logits[1]).any()  # depends on the image


def test_pre_logits_and_pooling():
    torch.manual_seed(0)
    model = create_model("spad_cls_test", num_classes=2, pool="avgtoken")
    x = torch.randn(2, 1, 16, 16, 16)
    features = model.forward_features(x, (1.0, 1.0, 1.0))
    pooled = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pooled, torch.cat([features[:, 1:].mean(1), features[:, 0]], dim=1))
    assert pooled.shape == (2, model.num_features) == (2, 128)


def test_reset_classifier_as_timm():
    model = create_model("spad_cls_test", num_classes=2, head="mlp")
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.reset_classifier(7)
    assert model.get_classifier()[-1].out_features == 7
    assert model(torch.randn(1, 1, 1, 16, 16), (1.0, 1.0, 1.0)).shape == (1, 7)
    model.reset_classifier(0, pool="token")  # features only, timm's convention
    assert model(torch.randn(1, 1, 1, 16, 16), (1.0, 1.0, 1.0)).shape == (1, 64)
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, backbone_before[key])  # the backbone is untouched


def test_bad_arguments_name_the_fix():
    with pytest.raises(SpadkitError, match="pool is one of"):
        SpadClassifier(create_model("spad_vit_test"), pool="max")
    with pytest.raises(SpadkitError, match="in_chans"):
        create_model("spad_cls_test")(torch.randn(1, 3, 16, 16, 16), (1.0, 1.0, 1.0))
