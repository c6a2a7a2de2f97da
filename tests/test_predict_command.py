"""``spadkit predict`` and the lazy normalisation it reads through, on real MNI152 crops."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from spadkit.active.features_cache import normalised_image
from spadkit.cli import main
from spadkit.infer import file_sha256, predict
from spadkit.io import OMEZarrStore, read_volume
from spadkit.io.nifti import write_nifti
from spadkit.models import create_model, save_pretrained
from spadkit.models.registry import PretrainedCfg
from spadkit.normalise import NormalisedArray, percentile_windows
from spadkit.predict_command import load_segmenter
from spadkit.stats import intensity_stats
from spadkit.volume import Volume
from tests.mni_gm import mni_crop

SHAPE = (16, 32, 32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 3-class SPAD-UNETR exported as a fine-tune does (num_classes in the provenance)."""
    torch.manual_seed(0)
    model = create_model("spad_unetr_test", num_classes=3)
    folder = tmp_path_factory.mktemp("export") / "seg"
    save_pretrained(model, PretrainedCfg(architecture="spad_unetr_test", provenance={"task": "SegFinetune", "num_classes": 3}), folder)
    return model.eval(), folder


@pytest.fixture
def store(tmp_path):
    """A store with one real MNI152 crop, ``mri`` (int16 as the T1 is stored)."""
    image = (mni_crop(SHAPE)[0] * 1000).astype(np.int16)
    store = OMEZarrStore(str(tmp_path / "brains.zarr"), mode="a")
    store.write_case("mri", Volume(image, np.diag([1.0, 1.0, 1.0, 1.0]), modality="MR"), attrs={"intensity": intensity_stats(image)})
    return store


def _expected(model, volume, stats):
    return predict(model, np.asarray(NormalisedArray(volume.array, percentile_windows(stats))), volume.spacing)


def test_a_fine_tune_export_loads_with_its_classes(exported):
    model, folder = exported
    loaded = create_model("spad_unetr_test", pretrained=str(folder))
    assert loaded.num_classes == 3
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_normalised_view_equals_the_sessions_rule(store):
    model = create_model("spad_vit_test")
    eager, _ = normalised_image(store, "mri", model)
    view = NormalisedArray(store.read_image("mri").array, percentile_windows(store.case_attrs("mri")["intensity"]))
    np.testing.assert_allclose(view[:, 3:9, :, 5:20], eager[:, 3:9, :, 5:20], atol=1e-6)
    assert view[:].min() == 0.0 and view[:].max() == 1.0


def test_predict_a_store_case_writes_label_groups_with_provenance(store, exported, capsys):
    model, folder = exported
    assert main(["predict", f"{store.url}/mri", "--model", str(folder), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["versions"] == {"pred": 1, "uncertainty": 1}
    reopened = OMEZarrStore(store.url)
    expected = _expected(model, reopened.read_image("mri"), reopened.case_attrs("mri")["intensity"])
    np.testing.assert_array_equal(reopened.read_label("mri", "pred").numpy()[0], expected.labels)
    provenance = json.loads(reopened.label_versions("mri", "pred")[-1]["message"].removeprefix("prediction "))
    assert provenance["checkpoint_sha256"] == file_sha256(folder / "model.pt") and provenance["model"] == "spad_unetr_test"


def test_predict_a_nifti_file_from_a_lightning_checkpoint(tmp_path, store, exported, capsys):
    model, _ = exported
    checkpoint = tmp_path / "last.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": "spad_unetr_test", "num_classes": 3, "in_chans": 1}}, checkpoint)
    source = tmp_path / "t1.nii.gz"
    write_nifti(store.read_image("mri").load(), source)
    assert main(["predict", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert [f.rsplit("/", 1)[-1] for f in files] == ["t1_pred.nii.gz", "t1_uncertainty.nii.gz"]
    volume = read_volume(source).canonical()
    expected = _expected(model, volume, intensity_stats(volume.array))
    written = nib.load(files[0])
    np.testing.assert_allclose(written.affine, nib.load(source).affine, atol=1e-6)
    np.testing.assert_array_equal(read_volume(files[0]).canonical().numpy()[0], expected.labels)
    np.testing.assert_allclose(read_volume(files[1]).canonical().numpy()[0], expected.uncertainty, atol=1e-6)


def test_monte_carlo_dropout_from_the_command_line(store, exported, capsys):
    _, folder = exported
    assert main(["predict", f"{store.url}/mri", "--model", str(folder), "--mc-dropout", "0.2", "--mc-samples", "3", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["uncertainty"] == "mc_dropout"
    assert OMEZarrStore(store.url).read_label("mri", "uncertainty").numpy().max() > 0


def test_bad_input_names_the_fix(tmp_path, store, exported, capsys):
    _, folder = exported
    source = tmp_path / "t1.nii.gz"
    write_nifti(store.read_image("mri").load(), source)
    cases = [
        (["predict", str(source), "--model", str(folder)], "needs --out"),
        (["predict", f"{store.url}/nope", "--model", str(folder)], "cases: mri"),
        (["predict", f"{store.url}/mri", "--model", str(tmp_path)], "not a save_pretrained folder"),
        (["predict", f"{store.url}/mri", "--model", str(folder), "--mc-dropout", "1.5"], "rate"),
    ]
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}}, bare)
    cases.append((["predict", f"{store.url}/mri", "--model", str(bare)], "not a checkpoint of spadkit finetune"))
    for argv, message in cases:
        assert main([*argv, "--quiet"]) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(Exception, match="2-channel|channel"):
        load_segmenter(folder)(torch.zeros(1, 2, 16, 16, 16), (1.0, 1.0, 1.0))
