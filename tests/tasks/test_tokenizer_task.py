"""TokenizerPretrain: the loss goes down on real MNI152 crops of every spacing kind; PUMIT's objective
(L1 on [-1, 1], global-batch usage, the gated GAN, the perceptual hook); diagnostics; export."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spadkit.models import PatchDiscriminator, create_model
from spadkit.models.tokenizer import code_entropies, sample_slices, tokenizer_losses
from spadkit.tasks import TokenizerPretrain
from tests.tasks.gloo_ranks import codebook_usage_on_rank
from tests.tasks.helpers import evaluate, fit

SMALL_DISC = (16, 32, 64)  # PUMIT's discriminator (128, 256, 512) is ~100x the compute: too slow for tests on CPU

KINDS = ("iso", "aniso", "2d")


def test_tokenizer_training_lowers_l1_and_exports(batches, tmp_path):
    torch.manual_seed(0)
    module = TokenizerPretrain("spad_vt_test", gan_weight=0.0, lr=3e-3, warmup_steps=1, diagnostics_every=1, export_dir=str(tmp_path / "vt"))
    data = [batches[k] for k in KINDS]
    before = evaluate(module, data)
    for losses in before:
        assert set(losses) == {"l1", "code_usage", "token_entropy", "loss"}
    trainer = fit(module, data * 10, steps=30)
    assert module.global_step == 30
    assert {"train/psnr", "train/psnr_patch_mean", "train/codes_used", "train/mi_content_given_position"} <= set(trainer.callback_metrics)
    after = evaluate(module, data)
    for kind, b, a in zip(KINDS, before, after):
        assert a["l1"] < 0.9 * b["l1"], (kind, b["l1"], a["l1"])
        assert a["loss"] < b["loss"], kind
    # on_train_end exported the tokenizer with its config
    exported = create_model("spad_vt_test", pretrained=tmp_path / "vt")
    assert exported.pretrained_cfg.architecture == "spad_vt_test"
    assert exported.pretrained_cfg.provenance["objective"] == "tokenizer"
    assert exported.pretrained_cfg.provenance["steps"] == 30
    diagnostics = exported.pretrained_cfg.provenance["diagnostics"]
    assert {"psnr", "psnr_patch_mean", "mi_content_given_position", "mi_code_position", "codes_used_window"} <= set(diagnostics)
    assert math.isfinite(diagnostics["psnr"]) and diagnostics["psnr_patch_mean"] > 10  # MNI crops: the mean is a fair baseline
    for key, value in module.tokenizer.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, rtol=0, atol=0)


def test_adversarial_phase_trains_the_discriminator(batches, tmp_path):
    torch.manual_seed(0)
    off = TokenizerPretrain("spad_vt_test", gan_weight=0.1, disc_channels=SMALL_DISC)  # default threshold: off until the discriminator is stable
    assert off.discriminator is not None and not off.gan_active
    assert "gan" not in evaluate(off, [batches["iso"]])[0]
    assert TokenizerPretrain("spad_vt_test", gan_weight=0.0).discriminator is None

    module = TokenizerPretrain("spad_vt_test", gan_weight=0.1, gan_threshold=10.0, disc_channels=SMALL_DISC, warmup_steps=1)
    module.disc_loss_last.fill_(0.0)
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


def test_defaults_are_pumits_objective():
    module = TokenizerPretrain("spad_vt_test")
    hp = module.hparams
    assert (hp.gan_weight, hp.gan_threshold, hp.usage_weight, hp.entropy_weight, hp.lr, hp.disc_lr) == (3e-3, 0.025, 1.0, 0.2, 1e-4, 1e-3)
    disc = module.discriminator
    assert isinstance(disc, PatchDiscriminator) and len(disc.units) == 4  # 3 stride-2 stages + 1 post conv
    assert [u.conv.out_channels for u in disc.units] == [128, 256, 512, 512]
    assert all(u.norm.num_groups == 16 for u in disc.units)
    # PUMIT's gate: the EMA (from 0.1, momentum 0.9) *and* the last loss must be at most the threshold
    assert not module.gan_active
    module.disc_loss_ema.fill_(0.01)
    assert not module.gan_active  # the last loss is still unknown (inf)
    module.disc_loss_last.fill_(0.05)
    assert not module.gan_active
    module.disc_loss_last.fill_(0.02)
    assert module.gan_active


def test_l1_is_on_the_signed_scale():
    torch.manual_seed(0)
    x, recon = torch.rand(2, 1, 4, 8, 8), torch.rand(2, 1, 4, 8, 8)
    losses = tokenizer_losses(x, recon, torch.zeros(2, 4, 1, 1, 1), usage_weight=0.0, entropy_weight=0.0)
    torch.testing.assert_close(losses["l1"], 2 * (recon - x).abs().mean())  # PUMIT compares on [-1, 1]
    torch.testing.assert_close(losses["loss"], losses["l1"])


def test_codebook_usage_is_over_the_gathered_batch():
    torch.manual_seed(0)
    here = torch.zeros(1, 4, 2, 1, 1, requires_grad=True)
    with torch.no_grad():
        here[:, 0] = 10.0  # this rank's tokens all pick code 0
    other = torch.tensor([0.0, 0.0, 0.5, 0.5])  # the other rank's mean probabilities
    usage, _ = code_entropies(here, gather=lambda local: torch.stack([local, other]))
    global_mean = (torch.softmax(here.detach().movedim(1, -1).reshape(-1, 4), -1).mean(0) + other) / 2
    torch.testing.assert_close(usage, -(global_mean * global_mean.log()).sum())
    local_only, _ = code_entropies(here)
    assert float(local_only) < 0.01 < float(usage)  # alone the rank looks collapsed; globally two more codes are in use
    usage.backward()  # gradients flow through this rank's share
    assert here.grad is not None and here.grad.abs().sum() > 0
    single, _ = code_entropies(here.detach(), gather=lambda local: local)  # world size 1: all_gather returns (K,)
    torch.testing.assert_close(single, local_only.detach())


class _SliceL1(nn.Module):
    """A stand-in perceptual network: a fixed random conv on 2D slices (LPIPS's interface)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(prediction.shape))
        assert prediction.min() >= -1 and target.max() <= 1
        return (self.conv(prediction) - self.conv(target)).abs().mean(dim=(1, 2, 3))


def test_perceptual_hook_gets_slices_and_stays_out_of_checkpoints(batches, tmp_path):
    torch.manual_seed(0)
    perceptual = _SliceL1()
    module = TokenizerPretrain("spad_vt_test", gan_weight=0.0, perceptual=perceptual, perceptual_weight=0.5, max_perceptual_slices=4, warmup_steps=1)
    losses = evaluate(module, [batches["iso"], batches["2d"]])
    assert perceptual.seen == [(4, 1, 64, 64), (1, 1, 64, 64)]  # 4 of the 32 slices; the 2D image's one slice
    assert losses[0]["perceptual"] > 0
    assert losses[0]["loss"] == pytest.approx(losses[0]["l1"] - losses[0]["code_usage"] + 0.2 * losses[0]["token_entropy"] + 0.5 * losses[0]["perceptual"], rel=1e-5)
    x = torch.rand(2, 1, 30, 8, 8)
    a, b = sample_slices(x, x.clone(), 24)
    assert a.shape == (48, 1, 8, 8) and torch.equal(a, b)  # the same slices of input and reconstruction
    trainer = fit(module, [batches["iso"]], steps=1)
    trainer.save_checkpoint(tmp_path / "vt.ckpt")
    raw = torch.load(tmp_path / "vt.ckpt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("perceptual.") for k in raw["state_dict"])
    restored = TokenizerPretrain.load_from_checkpoint(tmp_path / "vt.ckpt", map_location="cpu", weights_only=True, perceptual=_SliceL1())
    torch.testing.assert_close(restored.tokenizer.state_dict(), module.tokenizer.state_dict())


@pytest.mark.slow
def test_codebook_usage_gathers_across_two_gloo_ranks():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(codebook_usage_on_rank, args=(2, port, results), nprocs=2, join=True)
    # each rank alone uses one code (usage ~0); over the global batch two codes are used: ln 2
    assert results[0] == pytest.approx(math.log(2), abs=1e-3) and results[1] == pytest.approx(math.log(2), abs=1e-3)
