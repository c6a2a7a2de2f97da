"""SegFinetune trained end to end from a store whose label version annotates two axial slices only.

The claim: voxels outside the annotated mask are unknown, never background. A version with the
true MNI152 gray matter on two slices and garbage elsewhere must train exactly like the same
slices with the true labels elsewhere (same patches, losses and weights), and unlike the same
garbage saved as fully annotated.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from spadkit.data import DatasetSource, PatchDataModule
from spadkit.tasks.finetune import SegFinetune
from tests.data.test_annotated_stream import mni_store

STEPS = 3


def datamodule(url: str, **kwargs) -> PatchDataModule:
    args = {"patch_size": (16, 32, 32), "batch_size": 2, "samples_per_case": 4, "sampler": "label", "num_threads": 0, "augment": True, "seed": 4}
    return PatchDataModule(train=[DatasetSource(url, label="seg")], **(args | kwargs))


def train(url: str, steps: int = STEPS, **kwargs) -> tuple[SegFinetune, L.Trainer]:
    torch.manual_seed(0)
    task = SegFinetune(lr=3e-3, warmup_steps=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(task, datamodule=datamodule(url, **({"val_fraction": 0.3} if "val_check_interval" in kwargs else {})))
    return task, trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Weights after training on: garbage (background) outside the mask, the truth outside it, and
    the garbage version saved without a mask (so the garbage counts as labels)."""
    folder = tmp_path_factory.mktemp("finetune_annotated")
    garbage, _ = mni_store(str(folder / "garbage.zarr"), labels_outside="background")
    truth, _ = mni_store(str(folder / "truth.zarr"), labels_outside="truth")
    unmasked, _ = mni_store(str(folder / "unmasked.zarr"), labels_outside="background")
    unmasked.save_label("brain", unmasked.read_label("brain"), message="the same labels, claimed fully annotated")
    return {name: train(store.url)[0].state_dict() for name, store in (("garbage", garbage), ("truth", truth), ("unmasked", unmasked))}


def test_the_first_batches_differ_only_outside_the_annotated_mask(tmp_path):
    garbage, truth = (mni_store(str(tmp_path / f"{k}.zarr"), labels_outside=k)[0] for k in ("background", "truth"))
    a, b = (next(iter(datamodule(s.url, augment=False).train_dataloader())) for s in (garbage, truth))
    assert torch.equal(a["start"], b["start"]) and torch.equal(a["annotated"], b["annotated"])
    known = a["annotated"]
    assert torch.equal(a["label"][known], b["label"][known]) and not torch.equal(a["label"], b["label"])


def test_unannotated_labels_change_nothing_in_training(runs):
    for key, value in runs["garbage"].items():
        torch.testing.assert_close(runs["truth"][key], value, atol=0, rtol=0, msg=key)


def test_the_same_garbage_counted_as_labels_trains_differently(runs):
    """The control: without the mask the garbage is learnt, so the test above could fail."""
    assert any(not torch.equal(runs["unmasked"][k], v) for k, v in runs["garbage"].items())


def test_validation_on_a_fixed_split_of_the_reviewed_slices_feeds_early_stopping(tmp_path):
    store, _ = mni_store(str(tmp_path / "m.zarr"), slices=tuple(range(2, 30, 3)))
    stop = L.pytorch.callbacks.EarlyStopping(monitor="val/dice", mode="max", patience=5)
    _, trainer = train(store.url, steps=2, val_check_interval=1, limit_val_batches=2, callbacks=[stop])
    dm = trainer.datamodule
    train_rows = set(dm.train_stream.selections[0][0].slices)
    val_rows = set(dm.val_stream.selections[0][0].slices)
    assert val_rows and train_rows and not train_rows & val_rows and train_rows | val_rows == set(range(2, 30, 3))
    assert 0.0 <= float(trainer.callback_metrics["val/dice"]) <= 1.0 and stop.best_score.isfinite()
