"""UniMed's decomposed decoder: one set of weights gives per-voxel embeddings and per-query masks on
1 mm, 1x1x3 mm and 2D inputs (crops of the MNI152 T1), on the input grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spadkit.errors import SpadkitError
from spadkit.models import PretrainedCfg, UniMedNet, create_model, list_models, save_pretrained
from spadkit.models.unimed import class_probabilities
from tests.mni_gm import mni_crop

#: (crop shape, spacing (Z, Y, X) mm): isotropic 1 mm, 1x1x3 mm thick slices (8x16x16 patches), 2D
GRIDS = {"1mm": ((32, 32, 32), (1.0, 1.0, 1.0)), "1x1x3mm": ((8, 32, 48), (3.0, 1.0, 1.0)), "2d": ((1, 48, 32), (1.0, 1.0, 1.0))}


def _image(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> torch.Tensor:
    """``(2, 1, Z, Y, X)``: two MNI152 crops at ``spacing`` (thick slices: every third 1 mm slice)."""
    step = int(spacing[0])
    crops = [mni_crop((shape[0] * step, *shape[1:]), origin=(70, 90 + dy, 66))[0][:, ::step] for dy in (0, 20)]
    return torch.from_numpy(np.stack(crops))


@pytest.fixture(scope="module")
def model() -> UniMedNet:
    torch.manual_seed(0)
    return create_model("unimed_test", num_classes=3, extra_queries=2).eval()


def test_variants_registered():
    assert {"unimed_test", "unimed_small", "unimed_base"} <= set(list_models("unimed_*"))


@pytest.mark.parametrize("grid", GRIDS)
def test_outputs_lie_on_the_input_grid(model, grid):
    shape, spacing = GRIDS[grid]
    x = _image(shape, spacing)
    with torch.no_grad():
        out = model(x, torch.tensor([spacing, spacing]))
    queries = 3 + 2
    assert out.presence.shape == (2, queries)
    assert out.masks.shape == (2, queries, *shape)
    assert out.pixels.shape == (2, 16, *shape)
    assert all(torch.isfinite(t).all() for t in out)
    assert out.masks.std() > 0 and out.pixels.std(dim=(2, 3, 4)).min() > 0  # not constant maps
    assert (out.presence[0] != out.presence[1]).all()  # the queries read the image (two different crops)
    probabilities = class_probabilities(out, 3)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2, *shape))


def test_mask_logits_are_query_embedding_dot_pixel_embedding(model):
    shape, spacing = GRIDS["1x1x3mm"]
    x = _image(shape, spacing)
    with torch.no_grad():
        out = model(x, spacing)
        embed = model.decoder.mask_embed(out.queries)  # (B, Q, E)
    expected = (embed[:, :, :, None, None, None] * out.pixels[:, None]).sum(2)
    torch.testing.assert_close(out.masks, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pixel_level", [0, 2])
def test_one_set_of_weights_trains_on_every_grid(pixel_level):
    torch.manual_seed(1)
    model = create_model("unimed_test", num_classes=2, extra_queries=1, pixel_level=pixel_level)
    for grid, (shape, spacing) in GRIDS.items():
        model.zero_grad()
        out = model(_image(shape, spacing)[:1], spacing)
        (out.masks.logsumexp(1).mean() + out.presence[:, :2].sum()).backward()
        unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
        assert unused == ["backbone.mask_token"], (grid, unused)  # the SimMIM token only
        assert out.masks.shape[2:] == shape


def test_a_pretrained_backbone_is_loaded(tmp_path):
    torch.manual_seed(2)
    vit = create_model("spad_vit_test")
    save_pretrained(vit, PretrainedCfg(architecture="spad_vit_test"), tmp_path / "vit")
    model = create_model("unimed_test", num_classes=3, backbone=tmp_path / "vit")
    for key, value in vit.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)
    fresh = create_model("unimed_test", num_classes=3)
    assert not torch.equal(fresh.backbone.patch_embed.weight, vit.patch_embed.weight)
    save_pretrained(model, PretrainedCfg(architecture="unimed_test"), tmp_path / "unimed")
    with pytest.raises(SpadkitError, match="spad_vit_test"):
        create_model("unimed_test", backbone=tmp_path / "unimed")  # a whole UniMed folder is not a backbone


def test_bad_sizes_name_the_fix():
    with pytest.raises(SpadkitError, match="background"):
        create_model("unimed_test", num_classes=1)
    with pytest.raises(SpadkitError, match="channels"):
        create_model("unimed_test")(torch.zeros(1, 2, 16, 16, 16), (1.0, 1.0, 1.0))
