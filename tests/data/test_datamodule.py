"""PatchDataModule under a real Lightning Trainer on the CPU: training, checkpoints, resume, augmentation."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from spadkit.data import BatchAugment, PatchDataModule
from spadkit.models import total_stride


class Tiny(L.LightningModule):
    """One 1x1x1 convolution; records what every training step saw."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 1)
        self.positions: list[tuple[int, int]] = []
        self.sums: list[float] = []
        self.augments: list[dict | None] = []
        self.val_positions: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        self.positions.append((batch["stream"]["epoch"][0], batch["stream"]["index"][0]))
        self.sums.append(float(batch["image"].double().sum()))
        self.augments.append(batch.get("augment"))
        assert batch["image"].shape == (2, 1, 8, 8, 8)
        return self.conv(batch["image"]).mean()

    def validation_step(self, batch, batch_idx):
        self.val_positions.append((batch["stream"]["epoch"][0], batch["stream"]["index"][0]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **kwargs,
    )


def _data(store, **kwargs) -> PatchDataModule:
    args = {"patch_size": 8, "batch_size": 2, "samples_per_case": 2, "num_threads": 1, "seed": 9, "intensity": "none"}
    return PatchDataModule([store.url], **{**args, **kwargs})


def _fit(trainer, model, data, ckpt_path=None) -> None:
    with warnings.catch_warnings():
        # Lightning's notes on loaders it cannot see into: the stream shards, sizes and resumes itself
        for message in ("does not have many workers", "IterableDataset", "ended before the epoch ended", "Total length of `list`", "LeafSpec", "exists and is not empty"):
            warnings.filterwarnings("ignore", message=f".*{message}")
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)


@pytest.fixture(scope="module")
def uninterrupted(uniform_store, tmp_path_factory) -> Tiny:
    """Eleven steps in one go: one full epoch of 8 batches, then 3 of the next."""
    model = Tiny()
    _fit(_trainer(tmp_path_factory.mktemp("full"), 11), model, _data(uniform_store, augment=True))
    return model


def test_training_consumes_the_plan_in_order(uninterrupted):
    assert uninterrupted.positions == [(0, i) for i in range(8)] + [(1, i) for i in range(3)]


def test_augment_puts_its_parameters_on_the_training_batch(uninterrupted):
    assert all(a is not None for a in uninterrupted.augments)
    flips = torch.stack([a["flip"] for a in uninterrupted.augments])
    assert flips.shape == (11, 2, 3) and flips.any() and not flips.all()
    assert uninterrupted.augments[0]["scale"].shape == (2, 1)


@pytest.mark.parametrize("stop", [3, 8, 9])
def test_a_checkpoint_resumes_with_the_batch_after_the_last_one_trained(uniform_store, uninterrupted, tmp_path, stop):
    first = Tiny()
    trainer = _trainer(tmp_path, stop)
    _fit(trainer, first, _data(uniform_store, augment=True))
    assert first.positions == uninterrupted.positions[:stop]
    ckpt = tmp_path / "stop.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["PatchDataModule"]["train_stream"]
    assert (state["epoch"], state["next_batch"]) == divmod(stop, 8)

    resumed = Tiny()
    _fit(_trainer(tmp_path, 11), resumed, _data(uniform_store, augment=True), ckpt_path=ckpt)
    assert resumed.positions == uninterrupted.positions[stop:]
    assert resumed.sums == pytest.approx(uninterrupted.sums[stop:])  # the same voxels, augmented the same way
    for a, b in zip(resumed.augments, uninterrupted.augments[stop:]):
        assert torch.equal(a["flip"], b["flip"]) and torch.equal(a["gamma"], b["gamma"])


def test_worker_processes_and_validation(uniform_store, tmp_path):
    model = Tiny()
    data = _data(uniform_store, num_workers=2, val=[uniform_store.url], augment=BatchAugment(flip_prob=1.0, seed=1))
    _fit(_trainer(tmp_path, 4, val_check_interval=2, limit_val_batches=2), model, data)
    assert model.positions == [(0, i) for i in range(4)]
    assert all(a["flip"].all() for a in model.augments)
    # validation always replays the first batches of its fixed epoch
    assert model.val_positions == [(0, 0), (0, 1), (0, 0), (0, 1)]
    assert data.val_stream.state_dict()["next_batch"] == 0


def test_sampler_choice_is_checked(uniform_store):
    with pytest.raises(ValueError, match="sampler must be 'uniform' or 'label'"):
        PatchDataModule([uniform_store.url], sampler="foreground")


def thick_slice_stride(spacing):
    """A stride rule given as a function (Python API): Z is never down-sampled on thick slices."""
    return (1, 4, 4) if spacing[0] > 2 * min(spacing) else (4, 4, 4)


def test_patch_mm_and_a_function_multiple_reach_the_stream(mixed_store):
    data = PatchDataModule([mixed_store.url], patch_mm=11.2, patch_multiple=thick_slice_stride, intensity="none")
    data.setup("fit")
    shapes = {c.case_id: s for c, s in zip(data.train_stream.cases[0], data.train_stream.patch_shapes[0])}
    assert shapes["iso_a"] == (12, 12, 12)  # 11.2 voxels -> nearest multiple of 4
    assert shapes["aniso"] == (4, 12, 12)  # 11.2 mm / 3 mm = 3.7 slices, Z not rounded to 4s
    assert shapes["flat"] == (1, 24, 24)  # 22.4 voxels at 0.5 mm in-plane
    for dotted in ("tests.data.test_datamodule.thick_slice_stride", "builtins.print", "sys.exit"):  # configs name rules, never code
        with pytest.raises(ValueError, match="is not a named rule"):
            PatchDataModule([mixed_store.url], patch_multiple=dotted)
    assert PatchDataModule([mixed_store.url], patch_multiple="spad").stream_args["patch_size"].multiple is total_stride


def test_pumit_token_crops_and_augmentation_from_config_values(mixed_store):
    """What a YAML gives: ``patch_tokens: [1, 2, 2]``, ``patch_zoom``, ``augment: pumit``."""
    data = PatchDataModule([mixed_store.url], patch_tokens=[1, 2, 2], patch_zoom=[0.8, 1.5], patch_zoom_prob=1.0, augment="pumit", intensity="none")
    data.setup("fit")
    size = data.train_stream.patch_size
    assert size.tokens == [1, 2, 2] and size.zoom == (0.8, 1.5) and size.zoom_prob == 1.0
    shapes = {c.case_id: s for c, s in zip(data.train_stream.cases[0], data.train_stream.patch_shapes[0])}
    assert shapes["iso_a"] == (16, 32, 32) and shapes["aniso"] == (8, 32, 32) and shapes["flat"] == (1, 32, 32)
    assert data.augment.rotate_prob == 0.3 and data.augment.clamp == (0.0, 1.0)
    with pytest.raises(ValueError, match="augment must be"):
        PatchDataModule([mixed_store.url], augment="strong")
