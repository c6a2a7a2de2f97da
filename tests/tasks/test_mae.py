"""MAE (VISION-MAE): the encoder sees only visible tokens, one decoder for 2D, isotropic and anisotropic crops."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from spadkit.models import create_model
from spadkit.models.mae import MAEDecoder, mae_loss, masked_positions, random_keep
from spadkit.models.spad import batch_level
from spadkit.models.vit import token_grid
from spadkit.tasks import MAEPretrain
from tests.mni_gm import mni_t1_gm
from tests.tasks.helpers import evaluate, fit, make_batch

KINDS = ("iso", "aniso", "2d")


def _grid(batch):
    x = batch["image"]
    return token_grid(x.shape[2:], batch_level(batch["spacing"], x.shape[2]))


@pytest.mark.parametrize("ratio, tokens, visible", [(0.75, 8, 2), (0.75, 32, 8), (0.75, 4, 1), (0.99, 4, 1), (0.01, 4, 3)])
def test_random_keep_counts(ratio, tokens, visible):
    keep = random_keep(3, tokens, ratio, torch.Generator().manual_seed(0))
    assert keep.shape == (3, visible)
    assert all(row.unique().numel() == visible and (row.diff() > 0).all() for row in keep)
    assert masked_positions(keep, tokens).sum(1).tolist() == [tokens - visible] * 3


def test_encoding_every_token_equals_the_plain_forward(batches):
    torch.manual_seed(0)
    vit = create_model("spad_vit_test").eval()
    x, spacing = batches["iso"]["image"], batches["iso"]["spacing"]
    everything = torch.arange(math.prod(_grid(batches["iso"])))[None]
    encoded, _ = vit.forward_visible(x, spacing, everything)
    torch.testing.assert_close(encoded, vit.forward_features(x, spacing), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_the_encoder_never_sees_dropped_tokens(batches, kind):
    torch.manual_seed(0)
    vit = create_model("spad_vit_test").eval()
    batch = batches[kind]
    x, spacing, grid = batch["image"], batch["spacing"], _grid(batch)
    keep = random_keep(1, math.prod(grid), 0.75, torch.Generator().manual_seed(1))
    dropped = masked_positions(keep, math.prod(grid))[0].reshape(grid)
    voxel_mask = dropped.repeat_interleave(x.shape[2] // grid[0], 0).repeat_interleave(x.shape[3] // grid[1], 1).repeat_interleave(x.shape[4] // grid[2], 2)
    scrambled = torch.where(voxel_mask, torch.rand_like(x), x)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_visible(scrambled, spacing, keep)[0], vit.forward_visible(x, spacing, keep)[0])
        assert not torch.allclose(vit.forward_features(scrambled, spacing), vit.forward_features(x, spacing))


def test_one_decoder_reconstructs_every_grid_and_the_loss_reads_masked_tokens_only(batches):
    torch.manual_seed(0)
    vit = create_model("spad_vit_test")
    decoder = MAEDecoder(vit.embed_dim, 1, dim=32, depth=1, num_heads=2)
    for kind in KINDS:
        batch = batches[kind]
        x, spacing, grid = batch["image"], batch["spacing"], _grid(batch)
        level = batch_level(spacing, x.shape[2])
        keep = random_keep(1, math.prod(grid), 0.75)
        recon = decoder(vit.forward_visible(x, spacing, keep, level)[0], keep, grid, level)
        assert recon.shape == x.shape and torch.isfinite(recon).all(), kind
        masked = masked_positions(keep, math.prod(grid))
        visible_voxels = ~masked[0].reshape(grid).repeat_interleave(x.shape[2] // grid[0], 0).repeat_interleave(x.shape[3] // grid[1], 1).repeat_interleave(x.shape[4] // grid[2], 2)
        changed = torch.where(visible_voxels, recon + 5.0, recon)
        assert mae_loss(changed, x, grid, masked) == mae_loss(recon, x, grid, masked), kind


def _crops(t1, count: int, x_range: tuple[int, int], seed: int) -> list[dict]:
    """``count`` random 32x64x64 crops (1 mm) of the T1 whose X lies in ``x_range`` (one hemisphere)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        z, y, x = rng.integers(40, t1.shape[0] - 72), rng.integers(40, t1.shape[1] - 104), rng.integers(x_range[0], x_range[1] - 64)
        out.append(make_batch([t1[z : z + 32, y : y + 64, x : x + 64]], [(1.0, 1.0, 1.0)], ["MR"]))
    return out


def test_mae_learns_image_content_beyond_the_patch_mean(tmp_path):
    """Trained on crops of one hemisphere, evaluated on the other: the reconstruction of dropped
    tokens beats predicting each patch's mean (the zero of normalised targets), which the
    same network at random init does not."""
    t1, _ = mni_t1_gm()
    middle = t1.shape[2] // 2
    train, held_out = _crops(t1, 32, (30, middle), 0), _crops(t1, 8, (middle, t1.shape[2] - 30), 1)
    torch.manual_seed(0)
    module = MAEPretrain("spad_vit_test", mask_ratio=0.5, decoder_dim=32, decoder_depth=1, decoder_heads=2, lr=2e-3, warmup_steps=10, export_dir=str(tmp_path / "mae"))

    def relative(results):  # held-out loss as a share of the patch-mean predictor's
        return float(np.mean([r["mae"] for r in results]) / np.mean([r["mae_floor_zero"] for r in results]))

    at_init = relative(evaluate(module, held_out))
    fit(module, train * 4, steps=128)
    trained = relative(evaluate(module, held_out))
    assert at_init > 0.98 and trained < 0.96, (at_init, trained)
    exported = create_model("spad_vit_test", pretrained=tmp_path / "mae")
    assert exported.pretrained_cfg.provenance["recipe"] == "mae"
    for key, value in module.backbone.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, rtol=0, atol=0)


def test_bundled_mae_config_parses(capsys):
    from spadkit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["pretrain", "--config", "pretrain_mae", "--print_config"])
    assert info.value.code == 0
    assert "class_path: spadkit.tasks.MAEPretrain" in capsys.readouterr().out


def test_bundled_fsdp_config_parses(capsys):
    from spadkit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["pretrain", "--config", "pretrain_fsdp", "--print_config"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "FSDPStrategy" in out and "class_path: spadkit.tasks.MAEPretrain" in out


DDP_EXPORT = textwrap.dedent(
    """
    import sys
    import lightning as L
    import torch
    from spadkit.tasks import MAEPretrain

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for i in range(4):
                yield {"image": torch.rand(1, 1, 32, 32, 32, generator=g), "spacing": torch.ones(1, 3, dtype=torch.float64), "stream": {"epoch": [0], "index": [i], "group": [0], "step": [i]}}

    class Recorded(MAEPretrain):
        def on_train_end(self):
            super().on_train_end()
            torch.save(self.backbone.state_dict(), f"{sys.argv[1]}/rank{self.global_rank}.pt")

    if __name__ == "__main__":
        torch.manual_seed(0)
        module = Recorded("spad_vit_test", decoder_dim=32, decoder_depth=1, decoder_heads=2, warmup_steps=1, export_dir=f"{sys.argv[1]}/export")
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, torch.utils.data.DataLoader(Batches(), batch_size=None))
    """
)


@pytest.mark.slow
def test_the_export_gathers_weights_on_every_rank_and_writes_once(tmp_path):
    script = tmp_path / "ddp_export.py"
    script.write_text(DDP_EXPORT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    exported = create_model("spad_vit_test", pretrained=tmp_path / "export")
    for rank in (0, 1):
        weights = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in exported.state_dict().items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=0)
