"""TokenizerPretrain: the loss goes down on real MNI152 crops of every spacing kind; GAN phase; export."""

from __future__ import annotations

import torch

from spadkit.models import create_model
from spadkit.tasks import TokenizerPretrain
from tests.tasks.helpers import evaluate, fit

KINDS = ("iso", "aniso", "2d")


def test_tokenizer_training_lowers_l1_and_exports(batches, tmp_path):
    torch.manual_seed(0)
    module = TokenizerPretrain("spad_vt_test", lr=3e-3, warmup_steps=1, export_dir=str(tmp_path / "vt"))
    data = [batches[k] for k in KINDS]
    before = evaluate(module, data)
    for losses in before:
        assert set(losses) == {"l1", "code_usage", "token_entropy", "loss"}
    fit(module, data * 10, steps=30)
    assert module.global_step == 30
    after = evaluate(module, data)
    for kind, b, a in zip(KINDS, before, after):
        assert a["l1"] < 0.9 * b["l1"], (kind, b["l1"], a["l1"])
        assert a["loss"] < b["loss"], kind
    # on_train_end exported the tokenizer with its config
    exported = create_model("spad_vt_test", pretrained=tmp_path / "vt")
    assert exported.pretrained_cfg.architecture == "spad_vt_test"
    assert exported.pretrained_cfg.provenance["objective"] == "tokenizer"
    assert exported.pretrained_cfg.provenance["steps"] == 30
    for key, value in module.tokenizer.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, rtol=0, atol=0)


def test_adversarial_phase_trains_the_discriminator(batches, tmp_path):
    torch.manual_seed(0)
    off = TokenizerPretrain("spad_vt_test", gan_weight=0.1)  # default threshold: off until the discriminator is stable
    assert off.discriminator is not None and not off.gan_active
    assert "gan" not in evaluate(off, [batches["iso"]])[0]
    assert TokenizerPretrain("spad_vt_test").discriminator is None

    module = TokenizerPretrain("spad_vt_test", gan_weight=0.1, gan_threshold=10.0, warmup_steps=1)
    assert module.gan_active
    disc_before = [p.detach().clone() for p in module.discriminator.parameters()]
    ema_before = float(module.disc_loss_ema)
    trainer = fit(module, [batches["iso"], batches["2d"], batches["aniso"]], steps=4)
    # in manual optimisation Lightning counts every optimiser's steps: 2 batches = 4 steps
    assert module.global_step == 4
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2  # the generator's schedule saw 2 steps
    assert {"train/gan", "train/disc", "train/l1"} <= set(trainer.callback_metrics)
    assert float(module.disc_loss_ema) != ema_before
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, module.discriminator.parameters()))
    assert "gan" in evaluate(module, [batches["iso"]])[0]
    # its Lightning checkpoint (two optimisers, the EMA buffer) loads as plain data
    trainer.save_checkpoint(tmp_path / "vt.ckpt")
    restored = TokenizerPretrain.load_from_checkpoint(tmp_path / "vt.ckpt", map_location="cpu", weights_only=True)
    assert float(restored.disc_loss_ema) == float(module.disc_loss_ema)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=0)
