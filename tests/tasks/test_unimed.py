"""UniMedPretrain: one-stage joint learning (MAE on every sample + the composed supervised loss),
trained on hand-made joint batches of MNI152 crops; no memory bank to grow; checkpoints and export."""

from __future__ import annotations

import pytest
import torch

from spadkit.errors import SpadkitError
from spadkit.models import create_model
from spadkit.tasks import UniMedPretrain
from tests.models.test_unimed_targets import K
from tests.tasks.helpers import evaluate, fit
from tests.tasks.test_unimed_loss import _sub, mixed  # noqa: F401  (the fixture)

SMALL = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "warmup_steps": 1}


def _module(**kwargs) -> UniMedPretrain:
    torch.manual_seed(0)
    return UniMedPretrain("spad_vit_test", num_classes=K, extra_queries=1, **{**SMALL, **kwargs})


def _batches(mixed: dict) -> list[dict]:  # noqa: F811
    """Two-sample batches with a stream position (the MAE masks are seeded by it)."""
    return [{**_sub(mixed, pair), "stream": {"epoch": [0], "group": [0], "step": [i]}} for i, pair in enumerate(([0, 3], [1, 2], [2, 3]))]


def test_the_loss_is_mae_on_every_sample_plus_the_composed_loss(mixed):  # noqa: F811
    module = _module(mae_weight=0.5).eval()
    batches = _batches(mixed)
    with torch.no_grad():
        labelled = module.losses(batches[1])
        unlabelled = module.losses(_sub(mixed, [3, 3]))
    composed = labelled["presence"] + labelled["voxel_bce"] + labelled["voxel_dice"] + labelled["bags"]
    torch.testing.assert_close(labelled["loss"], 0.5 * labelled["mae"] + composed)
    assert labelled["labelled"] == 1.0 and composed > 0 and labelled["mae"] > 0
    assert unlabelled["labelled"] == 0.0 and unlabelled["loss"] == 0.5 * unlabelled["mae"] > 0  # only the self-supervised loss


@pytest.mark.slow
def test_joint_training_lowers_the_composed_loss_and_exports_the_backbone(mixed, tmp_path):  # noqa: F811
    module = _module(lr=3e-3, export_dir=str(tmp_path / "unimed"))
    batches = _batches(mixed)
    before = evaluate(module, batches)
    state = {k: v.shape for k, v in module.state_dict().items()}
    fit(module, batches * 4, steps=12)
    after = evaluate(module, batches)
    for term in ("voxel_bce", "bags"):
        assert sum(b[term] for b in after) < 0.8 * sum(b[term] for b in before), term
    # no queue or memory bank: the state is the weights alone, and training does not grow it
    assert {k: v.shape for k, v in module.state_dict().items()} == state
    assert [n for n, _ in module.named_buffers()] == []
    exported = create_model("spad_vit_test", pretrained=tmp_path / "unimed")
    assert exported.pretrained_cfg.provenance["recipe"] == "unimed"
    assert exported.pretrained_cfg.provenance["joint_classes"] == K
    for key, value in module.backbone.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.slow
def test_checkpoint_round_trip(mixed, tmp_path):  # noqa: F811
    module = _module()
    batches = _batches(mixed)
    trainer = fit(module, batches[:2], steps=2)
    trainer.save_checkpoint(tmp_path / "unimed.ckpt")
    restored = UniMedPretrain.load_from_checkpoint(tmp_path / "unimed.ckpt", map_location="cpu", weights_only=True)
    assert restored.hparams.num_classes == K and restored.hparams.extra_queries == 1
    assert restored.state_dict().keys() == module.state_dict().keys()
    torch.testing.assert_close(evaluate(restored, batches[1:2]), evaluate(module, batches[1:2]))


def test_bad_settings_name_the_fix():
    with pytest.raises(SpadkitError, match="weights must be >= 0"):
        _module(bag_weight=-1.0)
    with pytest.raises(SpadkitError, match="no UniMed decoder sizes"):
        UniMedPretrain("spad_eva_test")
