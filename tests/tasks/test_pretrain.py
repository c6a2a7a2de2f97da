"""MIMPretrain: objectives lower their losses on real crops, input checks, checkpoints, helpers."""

from __future__ import annotations

import itertools
import math
import os
from types import SimpleNamespace

import pytest
import torch

from spadkit.data.patches import PatchSize
from spadkit.data.sources import CaseInfo
from spadkit.errors import InvalidImageError, SpadkitError
from spadkit.models import PixelHead, PretrainedCfg, create_model, save_pretrained, token_grid
from spadkit.models.vit import token_patches
from spadkit.tasks import MIMPretrain, adamw_with_cosine
from tests.tasks.helpers import evaluate, fit, make_batch

KINDS = ("iso", "aniso", "2d")


@pytest.fixture
def tokenizer_dir(tmp_path):
    """A (randomly initialised) tokenizer exported with save_pretrained: its codes are fixed targets.

    It records no diagnostics, so the tasks below pass ``check_tokenizer=False``."""
    torch.manual_seed(0)
    return str(save_pretrained(create_model("spad_vt_test"), PretrainedCfg(architecture="spad_vt_test"), tmp_path / "vt"))


@pytest.fixture(scope="module")
def two_modality_batches(mni_crop):
    """Batches of two crops each with different modality labels and physical extents (scale bins)."""
    flipped = mni_crop[:, ::-1].copy()
    return [
        make_batch([mni_crop, 1 - flipped], [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0)], ["MR", "CT"]),  # extents 64 / 128 mm
        make_batch([mni_crop[::4], 1 - flipped[::4]], [(4.0, 1.0, 1.0), (8.0, 2.0, 2.0)], ["MR", "CT"]),
        make_batch([mni_crop[8:9], 1 - flipped[8:9], mni_crop[20:21]], [(1.0, 1.0, 1.0), (5.0, 5.0, 5.0), (1.0, 1.0, 1.0)], ["MR", "CT", "US"]),
    ]


def test_mae_only_lowers_loss(batches, tmp_path):
    torch.manual_seed(0)
    module = MIMPretrain("spad_vit_test", mim_weight=0.0, mae_weight=1.0, lr=5e-4, warmup_steps=1, export_dir=str(tmp_path / "vit"))
    assert module.tokenizer is None and module.pixel_head is not None
    data = [batches[k] for k in KINDS]
    before = evaluate(module, data)
    assert all(set(b) == {"mae", "loss", "mae_textured", "mae_floor_zero"} for b in before)  # MNI crops are textured
    fit(module, data * 20, steps=60)
    after = evaluate(module, data)
    for kind, b, a in zip(KINDS, before, after):
        assert a["mae"] < 0.98 * b["mae"], (kind, b, a)
    # the export holds the backbone and a config with provenance
    exported = create_model("spad_vit_test", pretrained=tmp_path / "vit")
    assert exported.pretrained_cfg.provenance["steps"] == 60
    assert exported.pretrained_cfg.modalities == ["CT", "MR"]
    assert exported.pretrained_cfg.provenance["recipe"] == "spadkit variant"
    for key, value in module.backbone.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, rtol=0, atol=0)


def test_mim_with_modality_and_scale_heads_lowers_losses(two_modality_batches, tokenizer_dir):
    torch.manual_seed(0)
    module = MIMPretrain(
        "spad_vit_test", tokenizer=tokenizer_dir, check_tokenizer=False, mim_weight=1.0, mae_weight=0.0, modality_weight=0.1, scale_weight=0.1, lr=1e-3, warmup_steps=1
    )
    assert module.pixel_head is None
    assert not any(p.requires_grad for p in module.tokenizer.parameters())
    tokenizer_state = {k: v.clone() for k, v in module.tokenizer.state_dict().items()}
    before = evaluate(module, two_modality_batches)
    assert all(set(b) == {"mim", "modality", "scale", "loss", "mim_floor_entropy"} for b in before)
    fit(module, two_modality_batches * 10, steps=30)
    after = evaluate(module, two_modality_batches)
    # the modality loss is adversarial (it hovers near chance by design): see the next test
    for name in ("mim", "scale", "loss"):
        for b, a in zip(before, after):
            assert a[name] < b[name], (name, before, after)
    assert all(math.isfinite(a["modality"]) for a in after)
    for key, value in module.tokenizer.state_dict().items():  # the tokenizer stayed frozen
        torch.testing.assert_close(value, tokenizer_state[key], rtol=0, atol=0)


def test_modality_head_learns_while_backbone_unlearns_modality(two_modality_batches):
    """Gradient reversal: the head descends the modality loss, the backbone ascends it."""
    batches = two_modality_batches[:2]

    def train_part(part: str) -> tuple[float, float]:
        torch.manual_seed(0)
        module = MIMPretrain("spad_vit_test", mim_weight=0.0, mae_weight=0.0, modality_weight=1.0)
        params = module.modality_head.parameters() if part == "head" else module.backbone.parameters()
        optimizer = torch.optim.SGD(params, lr=0.05 if part == "head" else 0.01)
        before = sum(e["modality"] for e in evaluate(module, batches))
        for step in range(10):
            module.train()
            torch.manual_seed(123)  # the same masks as evaluate()
            loss = module.losses(batches[step % 2])["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return before, sum(e["modality"] for e in evaluate(module, batches))

    before, after = train_part("head")
    assert after < before
    before, after = train_part("backbone")
    assert after > before


def test_tokenizer_stays_in_eval_mode(tokenizer_dir):
    module = MIMPretrain("spad_vit_test", tokenizer=tokenizer_dir, check_tokenizer=False)
    module.train()
    assert module.backbone.training and not module.tokenizer.training


def test_modality_loss_ignores_unknown_modalities(batches):
    torch.manual_seed(0)
    module = MIMPretrain("spad_vit_test", mim_weight=0.0, mae_weight=0.0, modality_weight=1.0)
    for unknown in (["US"], [None]):  # PatchStream gives None where a store records no modality
        losses = module.losses({**batches["iso"], "modality": unknown})
        assert losses["modality"].item() == 0.0
        losses["loss"].backward()  # still differentiable (zero gradient)


def test_missing_tokenizer_explains_the_fix():
    with pytest.raises(ValueError, match="needs a trained tokenizer") as info:
        MIMPretrain("spad_vit_test", mim_weight=1.0)
    assert "Fix:" in str(info.value) and "mim_weight: 0" in str(info.value)
    with pytest.raises(SpadkitError, match="missing pretrained file"):
        MIMPretrain("spad_vit_test", tokenizer="/nonexistent/tokenizer")


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_mask_ratio_raises(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        MIMPretrain("spad_vit_test", mim_weight=0.0, mask_ratio=ratio)


@pytest.mark.parametrize("weights", [{"mim_weight": 0.0, "mae_weight": 0.0}, {"mim_weight": 0.0, "mae_weight": -1.0, "scale_weight": 1.0}])
def test_bad_objective_weights_raise(weights):
    with pytest.raises(ValueError, match="objective weights"):
        MIMPretrain("spad_vit_test", **weights)


@pytest.mark.parametrize(("ratio", "tokens", "count"), [(0.55, 8, 4), (0.55, 4, 2), (0.75, 16, 12), (0.01, 8, 1), (0.99, 3, 3)])
def test_random_mask_counts(ratio, tokens, count):
    module = MIMPretrain("spad_vit_test", mim_weight=0.0, mask_ratio=ratio)
    mask = module.random_mask(5, tokens)
    assert mask.shape == (5, tokens) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [count] * 5


def test_token_grid():
    assert token_grid((32, 64, 64), 0) == (2, 4, 4)
    assert token_grid((8, 64, 64), 2) == (2, 4, 4)
    assert token_grid((16, 32, 48), 1) == (2, 2, 3)
    assert token_grid((1, 32, 32), 5) == (1, 2, 2)


def test_patches_follow_token_order():
    """MAE targets (``token_patches``) line up with the tokens the pixel head decodes."""
    head = PixelHead(4, 1)
    with torch.no_grad():
        head.unpatch.weight.zero_()
        head.unpatch.weight[0, 0] = 1.0
        head.unpatch.bias.zero_()
    for shape, level in [((32, 32, 48), 0), ((8, 32, 48), 2), ((1, 32, 48), 5)]:
        grid = token_grid(shape, level)
        n = math.prod(grid)
        tokens = torch.zeros(1, n, 4)
        tokens[0, :, 0] = torch.arange(float(n))
        patches = token_patches(head(tokens, grid, level), grid)
        assert patches.shape == (1, n, math.prod(shape) // n)
        expected = torch.arange(float(n))[None, :, None].expand_as(patches)  # depth taps are averaged: scale kept
        torch.testing.assert_close(patches, expected)


def test_adamw_with_cosine():
    module = MIMPretrain("spad_vit_test", mim_weight=0.0, modality_weight=1.0)
    config = adamw_with_cosine(module, lr=1.0, weight_decay=0.05, warmup_steps=10)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    named = dict(module.named_parameters())
    for name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed", "backbone.norm.weight", "backbone.blocks.0.attn.qkv.bias"):
        assert id(named[name]) in ids, name
    for name in ("backbone.patch_embed.weight", "backbone.blocks.0.attn.qkv.weight", "modality_head.net.0.weight"):
        assert id(named[name]) not in ids, name
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)
    lrs = []
    for _ in range(1000):  # without a trainer the schedule spans 1000 steps
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # then cosine decay
    assert lrs[-1] == pytest.approx(0.01, abs=1e-4)


def test_lightning_checkpoint_round_trip(two_modality_batches, tokenizer_dir, tmp_path):
    torch.manual_seed(0)
    module = MIMPretrain("spad_vit_test", tokenizer=tokenizer_dir, check_tokenizer=False, mae_weight=1.0, modality_weight=0.1, scale_weight=0.1, warmup_steps=1)
    trainer = fit(module, two_modality_batches[:2], steps=2, limit_val_batches=1, num_sanity_val_steps=0)
    assert "val/loss" not in trainer.callback_metrics  # no val loader given to fit
    trainer.validate(module, torch.utils.data.DataLoader(two_modality_batches[:1], batch_size=None), verbose=False)
    assert {"val/mim", "val/mae", "val/modality", "val/scale", "val/loss"} <= set(trainer.callback_metrics)
    ckpt = tmp_path / "mim.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain data only: loads without pickled code
    assert raw["hyper_parameters"]["tokenizer"] == tokenizer_dir
    restored = MIMPretrain.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    assert restored.hparams.mask_ratio == module.hparams.mask_ratio
    state = module.state_dict()
    assert restored.state_dict().keys() == state.keys()
    for key, value in restored.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    batch = two_modality_batches[0]
    # the position-only floor is a running diagnostic of this process, not checkpointed state
    expected = {k: v for k, v in evaluate(module, [batch])[0].items() if k != "mim_floor_position"}
    torch.testing.assert_close(evaluate(restored, [batch]), [expected])


def _tokenizer_with(tmp_path, name: str, diagnostics: dict | None) -> str:
    provenance = {"diagnostics": diagnostics} if diagnostics is not None else {}
    return str(save_pretrained(create_model("spad_vt_test"), PretrainedCfg(architecture="spad_vt_test", provenance=provenance), tmp_path / name))


def test_mim_refuses_a_tokenizer_that_does_not_beat_the_patch_mean(tmp_path):
    weak = _tokenizer_with(tmp_path, "weak", {"psnr": 10.4, "psnr_patch_mean": 16.0, "mi_content_given_position": 0.0})
    with pytest.raises(SpadkitError, match="worse than each token's mean intensity") as error:
        MIMPretrain("spad_vit_test", tokenizer=weak)
    assert error.value.path == weak and "check_tokenizer=False" in error.value.fix and "train/psnr" in error.value.fix
    silent = _tokenizer_with(tmp_path, "silent", None)
    with pytest.raises(SpadkitError, match="records no diagnostics") as error:
        MIMPretrain("spad_vit_test", tokenizer=silent)
    assert error.value.path == silent
    good = _tokenizer_with(tmp_path, "good", {"psnr": 18.0, "psnr_patch_mean": 16.0})
    assert MIMPretrain("spad_vit_test", tokenizer=good).tokenizer is not None
    assert MIMPretrain("spad_vit_test", tokenizer=weak, check_tokenizer=False).tokenizer is not None


def test_checkpoint_loads_after_the_tokenizer_folder_moved(two_modality_batches, tokenizer_dir, tmp_path):
    """Regression: load_from_checkpoint failed with 'missing pretrained file' once the tokenizer folder moved."""
    torch.manual_seed(0)
    module = MIMPretrain("spad_vit_test", tokenizer=tokenizer_dir, check_tokenizer=False, mae_weight=0.0, warmup_steps=1)
    trainer = fit(module, two_modality_batches[:1], steps=1)
    trainer.save_checkpoint(tmp_path / "mim.ckpt")
    os.rename(tokenizer_dir, tmp_path / "moved")
    with pytest.warns(UserWarning, match="not found: rebuilding spad_vt_test"):
        restored = MIMPretrain.load_from_checkpoint(tmp_path / "mim.ckpt", map_location="cpu", weights_only=True)
    torch.testing.assert_close(restored.tokenizer.state_dict(), module.tokenizer.state_dict(), rtol=0, atol=0)
    batch = two_modality_batches[0]
    assert evaluate(restored, [batch])[0]["mim"] == pytest.approx(evaluate(module, [batch])[0]["mim"])


def test_tasks_take_the_batch_level_without_recomputing_it(batches, monkeypatch):
    """The level comes from batch["level"] (an int on the host after on_before_batch_transfer)."""
    module = MIMPretrain("spad_vit_test", mim_weight=0.0)
    batch = dict(batches["aniso"], level=torch.tensor([2]))
    moved = module.on_before_batch_transfer(batch, 0)
    assert moved["level"] == 2 and isinstance(moved["level"], int)
    import spadkit.models.vit as vit

    def fail(*args):
        raise AssertionError("the level was recomputed from the spacing")

    monkeypatch.setattr(vit, "batch_level", fail)
    assert math.isfinite(evaluate(module, [moved])[0]["mae"])
    with pytest.raises(AssertionError, match="recomputed"):
        evaluate(module, [batches["aniso"]])  # without a level the spacing is the only source
    monkeypatch.undo()
    mixed = dict(batches["iso"], level=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one anisotropy level"):
        module.on_before_batch_transfer(mixed, 0)


def test_channel_count_is_checked_against_in_chans(batches):
    model = create_model("spad_vit_test", in_chans=1)
    two = batches["iso"]["image"].repeat(1, 2, 1, 1, 1)
    with pytest.raises(InvalidImageError, match="C = 1 channels") as error:
        model.forward_features(two, batches["iso"]["spacing"])
    assert "in_chans=2" in error.value.fix


def test_aux_heads_switch_off_when_the_data_cannot_pose_their_task(monkeypatch):
    def case(modality, shape, spacing):
        return CaseInfo("d", "s", "c", (1, *shape), spacing, (), modality, "int16", (), None, 0)

    mr3d, ct2d = case("MR", (160, 160, 160), (1.0, 1.0, 1.0)), case("CT", (1, 128, 128), (1.0, 0.66, 0.66))
    module = MIMPretrain("spad_vit_test", mim_weight=0.0, modality_weight=0.1, scale_weight=0.1)
    stream = SimpleNamespace(cases=[[mr3d, ct2d]], patch_shapes=[[(32, 32, 32), (1, 48, 48)]], patch_size=PatchSize(voxels=32))
    monkeypatch.setattr(MIMPretrain, "trainer", property(lambda self: SimpleNamespace(datamodule=SimpleNamespace(train_stream=stream))))
    module._trainer = object()
    with pytest.warns(UserWarning) as record:
        module.setup("fit")
    messages = " ".join(str(w.message) for w in record)
    assert "every crop's in-plane extent (32-32 mm) falls in one bin" in messages
    assert "confounded with dimensionality" in messages
    assert module.scale_head is None and module.modality_head is None and module.hparams.scale_weight == 0.0
    assert set(module.heads_off) == {"scale", "modality"}
    # crops of two scales and two 3D modalities: both tasks exist
    both = MIMPretrain("spad_vit_test", mim_weight=0.0, modality_weight=0.1, scale_weight=0.1)
    ct3d = case("CT", (100, 512, 512), (2.5, 0.7, 0.7))
    stream.cases, stream.patch_shapes = [[mr3d, ct3d]], [[(32, 32, 32), (16, 256, 256)]]
    both._trainer = object()
    both.setup("fit")
    assert both.scale_head is not None and both.modality_head is not None and not both.heads_off
    # one case, but token-grid crops zoomed 0.75-2x in-plane: 48-128 mm, two bins
    zoomed = MIMPretrain("spad_vit_test", mim_weight=0.0, scale_weight=0.1)
    stream.cases, stream.patch_shapes = [[mr3d]], [[(16, 64, 64)]]
    stream.patch_size = PatchSize(tokens=(1, 4, 4), zoom=(0.75, 2.0), zoom_prob=0.5)
    zoomed._trainer = object()
    zoomed.setup("fit")
    assert zoomed.scale_head is not None
