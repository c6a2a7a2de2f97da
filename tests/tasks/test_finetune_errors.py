"""Bad fine-tuning input fails before the first step with the case and the fix, never as a raw torch error."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from spadkit.data import DatasetSource, PatchDataModule
from spadkit.errors import SpadkitError
from spadkit.ingest import intensity_stats
from spadkit.io import OMEZarrStore
from spadkit.models import PretrainedCfg, create_model, save_pretrained
from spadkit.tasks.finetune import SegFinetune, load_weights
from spadkit.volume import LabelVolume, Volume
from tests.data.test_annotated_stream import SHAPE, mni_store
from tests.mni_gm import mni_crop


def fit(task: SegFinetune, url: str) -> L.Trainer:
    """``trainer.fit`` on the store's ``seg`` labels; the test fails if a step runs."""
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    task.training_step = lambda *args: pytest.fail("a training step ran: the error came too late")
    dm = PatchDataModule(train=[DatasetSource(url, label="seg")], patch_size=(16, 32, 32), batch_size=1, num_threads=0)
    trainer.fit(task, datamodule=dm)
    return trainer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 2-class spad_unetr_test saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("unetr")
    save_pretrained(create_model("spad_unetr_test", num_classes=2), PretrainedCfg(architecture="spad_unetr_test"), folder)
    return folder


def test_weights_of_another_class_count_channel_count_or_architecture_name_the_fix(exported):
    with pytest.raises(SpadkitError, match="predicts 2 classes, the model is configured for 3(?s:.*)num_classes=2"):
        SegFinetune(num_classes=3, init_weights=str(exported))  # the folder, not only its model.pt
    with pytest.raises(SpadkitError, match="takes 1-channel images, the model 2(?s:.*)in_chans=1"):
        SegFinetune(in_chans=2, init_weights=str(exported))
    with pytest.raises(SpadkitError, match=r"another architecture(?s:.*)model=\.\.\."):
        SegFinetune(model="spad_unetr_small", init_weights=str(exported / "model.pt"))
    save_pretrained(create_model("spad_vit_test"), PretrainedCfg(architecture="spad_vit_test"), exported.parent / "vit")
    with pytest.raises(SpadkitError, match=r"backbone takes 1 channel\(s\), the model was asked for in_chans=2"):
        SegFinetune(in_chans=2, backbone=str(exported.parent / "vit"))
    model = create_model("spad_unetr_test", num_classes=2)
    load_weights(model, exported)
    torch.testing.assert_close(model.state_dict(), create_model("spad_unetr_test", pretrained=str(exported), num_classes=2).state_dict())


def test_images_of_another_channel_count_fail_at_setup_naming_the_case(tmp_path):
    image, truth = mni_crop(SHAPE)
    volume = Volume((np.concatenate([image, 1 - image]) * 1000).astype(np.int16), modality="MR")
    label = LabelVolume(truth[None].astype(np.uint8))
    store = OMEZarrStore(str(tmp_path / "two.zarr"), mode="a")
    store.write_case("dual_echo", volume, label, attrs={"intensity": intensity_stats(volume, label)})
    with pytest.raises(SpadkitError, match="case dual_echo has 2-channel images, the model takes in_chans=1(?s:.*)in_chans=2"):
        fit(SegFinetune(), store.url)


def test_label_values_beyond_num_classes_fail_at_setup_naming_case_and_version(tmp_path):
    store, truth = mni_store(str(tmp_path / "m.zarr"))
    tissue = (truth + (np.indices(SHAPE)[2] > 40)).astype(np.uint8)  # classes 0, 1, 2
    store.save_label("brain", LabelVolume(tissue[None], store.read_image("brain").affine))
    with pytest.raises(SpadkitError, match=r"case brain: label 'seg' version 3 holds class\(es\) \[2\](?s:.*)num_classes=3"):
        fit(SegFinetune(num_classes=2), store.url)


def test_an_empty_annotated_mask_fails_at_setup_naming_case_and_version(tmp_path):
    store, _ = mni_store(str(tmp_path / "m.zarr"))
    store.save_label("brain", store.read_label("brain"), annotated=np.zeros(SHAPE, bool))
    with pytest.raises(SpadkitError, match="case brain: label 'seg' version 3 has an empty annotated mask"):
        fit(SegFinetune(), store.url)
