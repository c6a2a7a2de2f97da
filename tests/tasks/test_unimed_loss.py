"""UniMed's composed loss: a sample with no labels adds no supervised loss and no gradient; a batch
mixing mask, box, image-class and unlabelled samples (MNI152 crops) gives finite losses and
gradients to the decoder and the backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spadkit.models import create_model
from spadkit.models.unimed import UniMedOutput, compose_targets
from spadkit.tasks.unimed import composed_loss
from tests.mni_gm import mni_crop
from tests.models.test_unimed_targets import K, add_boxes, add_classes, add_mask, unlabelled_batch

SHAPE = (16, 32, 32)  # 1 mm: 1x2x2 tokens of the test ViT


@pytest.fixture(scope="module")
def mixed() -> dict:
    """Four MNI152 crops: a partly annotated mask (gray matter = 1), an exhaustive box of class 2,
    an image-level record (1 absent, 2 present), and one without labels."""
    crops = [mni_crop(SHAPE, origin=(70, 90, 60 + 20 * i)) for i in range(4)]
    batch = unlabelled_batch(4, SHAPE, torch.from_numpy(np.stack([c[0] for c in crops])))
    annotated = torch.zeros(SHAPE, dtype=torch.bool)
    annotated[4:6] = True
    add_mask(batch, 0, torch.from_numpy(crops[0][1]), annotated)
    add_boxes(batch, 1, [[2, 3.0, 4.0, 5.0, 12.0, 20.0, 26.0]], exhaustive=[2])
    add_classes(batch, 2, present=[2], absent=[1])
    return batch


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("unimed_test", num_classes=K, extra_queries=1)


def _sub(batch: dict, index: list[int]) -> dict:
    return {k: [v[i] for i in index] if isinstance(v, list) else v[index] for k, v in batch.items()}


def test_an_unlabelled_sample_adds_no_loss_and_no_gradient(mixed):
    model = _model()
    image = mixed["image"].clone().requires_grad_(True)
    out = model(image, (1.0, 1.0, 1.0))
    losses = composed_loss(out, compose_targets(mixed, K))
    losses["supervised"].backward()
    assert image.grad[3].abs().sum() == 0  # the unlabelled crop: no gradient reaches it
    assert all(image.grad[i].abs().sum() > 0 for i in range(3))
    with torch.no_grad():  # and leaving it out changes no term
        labelled = _sub(mixed, [0, 1, 2])
        alone = composed_loss(model(labelled["image"], (1.0, 1.0, 1.0)), compose_targets(labelled, K))
    for name, value in alone.items():
        torch.testing.assert_close(value, losses[name].detach(), rtol=1e-4, atol=1e-5, msg=name)


def test_a_batch_without_labels_has_zero_supervised_loss_with_a_graph(mixed):
    model = _model()
    unlabelled = _sub(mixed, [3, 3])
    losses = composed_loss(model(unlabelled["image"], (1.0, 1.0, 1.0)), compose_targets(unlabelled, K))
    assert all(float(v.detach()) == 0.0 for v in losses.values())
    losses["supervised"].backward()  # DDP needs every parameter in the graph, even at zero
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for n, p in model.named_parameters() if n != "backbone.mask_token")


def test_a_mixed_batch_trains_every_part(mixed):
    model = _model()
    losses = composed_loss(model(mixed["image"], (1.0, 1.0, 1.0)), compose_targets(mixed, K))
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    losses["supervised"].backward()
    for part in ("backbone.blocks", "backbone.patch_embed", "decoder.pixel", "decoder.semantic", "decoder.presence", "decoder.mask_embed"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), part
        assert sum(g.abs().sum() for g in grads) > 0, part
    # the extra query has no label: only through attention does it matter, never by its own outputs
    assert model.decoder.semantic.queries.grad[0, K:].abs().sum() > 0


def test_each_level_reaches_only_its_terms(mixed):
    model = _model()
    with torch.no_grad():
        out = model(mixed["image"], (1.0, 1.0, 1.0))
    for index, nonzero in (([0], {"presence", "voxel_bce", "voxel_dice"}), ([1], {"presence", "voxel_bce", "bags"}), ([2], {"presence", "voxel_bce"})):
        single = _sub(mixed, index)
        part = UniMedOutput(*(t[index] for t in out))
        losses = composed_loss(part, compose_targets(single, K))
        assert {k for k, v in losses.items() if v > 0} == nonzero | {"supervised"}, (index, losses)


def test_the_bag_term_pushes_only_the_largest_logit_inside_the_box():
    batch = unlabelled_batch(1)
    add_boxes(batch, 0, [[1, 0.0, 2.0, 2.0, 2.0, 6.0, 6.0]], exhaustive=[])
    masks = torch.randn(1, K, 4, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = UniMedOutput(torch.zeros(1, K, requires_grad=True), masks, torch.zeros(1), torch.zeros(1))
    targets = compose_targets(batch, K)
    composed_loss(out, targets)["bags"].backward()
    grad = masks.grad[0, 1]
    inside = masks[0, 1, 0:2, 2:6, 2:6]
    peak = torch.nonzero(masks[0, 1] == inside.max())[0].tolist()
    assert torch.count_nonzero(masks.grad) == 1 and grad[tuple(peak)] < 0  # raise the peak, nothing else
