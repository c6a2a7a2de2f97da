"""UniMedPretrain on a real joint PatchStream: stores of MNI152 crops with a ventricle label map, an
exhaustive box set, image-level classes and none, mixed in batches; the bundled config through
LightningCLI."""

from __future__ import annotations

import json
import warnings

import lightning as L
import pytest

from spadkit.data import DatasetSource, PatchDataModule
from spadkit.errors import SpadkitError
from spadkit.io import OMEZarrStore
from spadkit.models import create_model
from spadkit.tasks import UniMedPretrain
from tests.mni_ventricles import bounding_boxes, write_crop

pytestmark = pytest.mark.slow  # three stores written, then Lightning fits: ~30 s on 2 shared cores

K = 3  # background and the two lateral ventricles
SMALL = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "warmup_steps": 1}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[dict]:
    """Three stores: ``m0`` with the label map ``seg``; ``b0`` with boxes and ``c0`` with image classes; ``u0`` unlabelled."""
    root = tmp_path_factory.mktemp("unimed_stores")
    masks, weak, plain = (OMEZarrStore(str(root / f"{name}.zarr"), mode="a") for name in ("masks", "weak", "plain"))
    write_crop(masks, "m0", with_label=True)
    weak.save_boxes("b0", *bounding_boxes(write_crop(weak, "b0", origin=(60, 92, 60))))
    write_crop(weak, "c0", origin=(66, 98, 66))
    weak.save_image_classes("c0", present=[1, 2])
    write_crop(plain, "u0", origin=(62, 94, 62))
    return [{"store": str(root / "masks.zarr"), "label": "seg"}, {"store": str(root / "weak.zarr"), "boxes": "boxes", "classes": "classes"}, {"store": str(root / "plain.zarr")}]


def _datamodule(sources: list[dict], joint_classes: int) -> PatchDataModule:
    return PatchDataModule([DatasetSource(**s) for s in sources], joint_classes=joint_classes, patch_size=32, patch_multiple="spad", batch_size=4, samples_per_case=2, num_threads=0)


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def test_joint_pretraining_trains_on_mixed_stream_batches(sources, tmp_path):
    module = UniMedPretrain("spad_vit_test", num_classes=K, export_dir=str(tmp_path / "export"), **SMALL)
    trainer = _trainer(3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=_datamodule(sources, K))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert 0.0 < metrics["train/labelled"] <= 1.0 and metrics["train/mae"] > 0 and metrics["train/voxel_bce"] > 0, metrics
    assert create_model("spad_vit_test", pretrained=tmp_path / "export").pretrained_cfg.provenance["recipe"] == "unimed"


def test_the_class_count_must_match_the_stream(sources):
    module = UniMedPretrain("spad_vit_test", num_classes=K + 1, **SMALL)
    with pytest.raises(SpadkitError, match="joint classes"):
        _trainer(1).fit(module, datamodule=_datamodule(sources, K))


def test_the_bundled_config_runs_through_lightning_cli(sources, tmp_path):
    from spadkit.tasks.launch import run_pretrain

    run_pretrain(
        [
            "--config", "pretrain_unimed", f"--data.train={json.dumps(sources)}", "--data.patch_tokens=[2, 2, 2]", "--data.augment=false",
            "--trainer.max_steps=2", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.decoder_dim=32", f"--model.init_args.export_dir={tmp_path / 'export'}",
        ]
    )  # fmt: skip
    assert create_model("spad_vit_test", pretrained=tmp_path / "export").pretrained_cfg.provenance["recipe"] == "unimed"
