"""Saving a region prediction over a saved one: ``save_prediction(..., base_version=)`` and
``spadkit predict --region``, on real MNI152 grids (2x2x2 mm and a 1x1x3 mm thick-slice copy).

The new ``pred``/``uncertainty`` versions must equal a full prediction of the new model inside the
region and the base versions outside it, and be written copy-on-write: at most the storage chunks
the region touches (at every pyramid level), the rest shared.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from spadkit.cli import main
from spadkit.errors import SpadkitError
from spadkit.infer import predict, previous_prediction, save_prediction
from spadkit.io import OMEZarrStore
from spadkit.models import create_model, save_pretrained
from spadkit.models.registry import PretrainedCfg
from spadkit.normalise import NormalisedArray, percentile_windows
from spadkit.stats import intensity_stats
from spadkit.volume import Volume
from tests.mni_gm import mni_t1_gm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: grid name -> (1 mm crop origin and shape, block factors, window, slab): each grid spans two or
#: more chunks along Z (64 slices at 2 mm, 16 at 3 mm), so a slab leaves whole chunk rows untouched.
GRIDS = {
    "2x2x2": ((40, 70, 60), (144, 96, 96), (2, 2, 2), (32, 48, 48), (slice(10, 14),)),
    "1x1x3": ((40, 80, 60), (144, 64, 80), (3, 1, 1), (16, 64, 80), (slice(20, 24), slice(10, 60))),
}


def _grid(name: str) -> tuple[Volume, tuple[int, int, int], tuple[slice, ...]]:
    """The MNI152 T1 crop block-averaged to the grid (a ``Volume`` with its spacing), window and slab."""
    origin, shape, factors, window, slab = GRIDS[name]
    t1 = mni_t1_gm()[0][tuple(slice(o, o + n) for o, n in zip(origin, shape))]
    coarse = t1.reshape(shape[0] // factors[0], factors[0], shape[1] // factors[1], factors[1], shape[2] // factors[2], factors[2]).mean((1, 3, 5))
    return Volume.from_spacing(coarse[None].astype(np.float32), spacing=tuple(float(f) for f in factors), modality="MR"), window, slab


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two 3-class segmenters that disagree: the second is the first with a re-initialised classifier
    (what a correction round changes)."""
    torch.manual_seed(0)
    old = create_model("spad_unetr_test", num_classes=3).eval()
    new = create_model("spad_unetr_test", num_classes=3).eval()
    new.load_state_dict(old.state_dict())
    torch.manual_seed(1)
    new.reset_classifier(3)
    return old, new.eval()


def _touched_chunks(store: OMEZarrStore, case_id: str, name: str, box: tuple[slice, ...]) -> tuple[int, int]:
    """(chunks the box touches, all chunks) of a label's arrays, summed over the pyramid levels."""
    factors = store.case_attrs(case_id)["pyramid_factors_zyx"]
    touched = total = 0
    for level, factor in enumerate(factors):
        array = store.read_label(case_id, name, level=level).array
        chunks, shape = array.chunks[1:], array.shape[1:]
        counts = [math.ceil(math.ceil(b.stop / f) / c) - (b.start // f) // c for b, f, c in zip(box, factor, chunks)]
        touched += math.prod(counts)
        total += math.prod(math.ceil(n / c) for n, c in zip(shape, chunks))
    return touched, total


@pytest.mark.parametrize("grid", list(GRIDS))
def test_region_version_is_the_new_prediction_inside_and_the_old_outside(grid, tmp_path):
    volume, window, slab = _grid(grid)
    store = OMEZarrStore(str(tmp_path / "s.zarr"), mode="a")
    store.write_case("mni", volume)
    image = store.read_image("mni")
    old_model, new_model = _models()
    first = save_prediction(store, "mni", predict(old_model, image, window=window), model_name="old")
    assert first == {"pred": 1, "uncertainty": 1}

    part = predict(new_model, image, window=window, region=slab)
    box = part.region
    versions = save_prediction(store, "mni", part, model_name="new", base_version=first["pred"])
    assert versions == {"pred": 2, "uncertainty": 2}

    full = predict(new_model, image, window=window)
    old = {name: store.read_label("mni", name, 1).numpy()[0] for name in versions}
    new = {name: store.read_label("mni", name, 2).numpy()[0] for name in versions}
    outside = np.ones(image.spatial_shape, bool)
    outside[box] = False
    percent = np.rint(full.uncertainty / np.log(3) * 100).clip(0, 100).astype(np.uint8)
    for name, expected in (("pred", full.labels), ("uncertainty", percent)):
        np.testing.assert_array_equal(new[name][box], expected[box])
        np.testing.assert_array_equal(new[name][outside], old[name][outside])
    assert (new["pred"][box] != old["pred"][box]).any()  # the models disagree there: the check has teeth

    for name in versions:
        entry = store.label_versions("mni", name)[-1]
        touched, total = _touched_chunks(store, "mni", name, box)
        assert touched < total
        assert 0 < entry["chunks_written"] <= touched
        assert entry["chunks_written"] + entry["chunks_shared"] == total
        provenance = json.loads(entry["message"].removeprefix("prediction "))
        assert provenance["region"] == [[b.start, b.stop] for b in box]
        assert provenance["base_versions"] == first and provenance["model"] == "new"


def test_a_region_refuses_without_a_saved_prediction_or_a_base(tmp_path):
    volume, window, slab = _grid("2x2x2")
    store = OMEZarrStore(str(tmp_path / "s.zarr"), mode="a")
    store.write_case("mni", volume)
    model, _ = _models()
    part = predict(model, store.read_image("mni"), window=window, region=slab)
    with pytest.raises(SpadkitError, match="no saved prediction") as info:
        save_prediction(store, "mni", part, base_version=1)
    assert info.value.path.endswith("mni/labels/pred") and "whole volume" in info.value.fix
    assert store.label_names("mni") == []  # nothing written

    save_prediction(store, "mni", predict(model, store.read_image("mni"), window=window))
    with pytest.raises(SpadkitError, match="base_version"):
        save_prediction(store, "mni", part)
    with pytest.raises(SpadkitError, match="no version 7"):
        save_prediction(store, "mni", part, base_version=7)
    flipped = predict(model, store.read_image("mni"), window=window, region=slab, flips=True, uncertainty="flip_variance")
    with pytest.raises(SpadkitError, match="'entropy' uncertainty"):
        save_prediction(store, "mni", flipped, base_version=1)
    assert [v["version"] for v in store.label_versions("mni", "pred")] == [1]
    assert previous_prediction(store, "mni") == {"pred": 1, "uncertainty": 1}


def _export(model: torch.nn.Module, folder) -> str:
    save_pretrained(model, PretrainedCfg(architecture="spad_unetr_test", provenance={"task": "SegFinetune", "num_classes": 3}), folder)
    return str(folder)


def test_predict_command_region_refreshes_a_slab(tmp_path, capsys):
    volume, window, slab = _grid("1x1x3")
    raw = (volume.numpy() * 1000).astype(np.int16)
    store = OMEZarrStore(str(tmp_path / "brains.zarr"), mode="a")
    store.write_case("mni", Volume(raw, volume.affine, modality="MR"), attrs={"intensity": intensity_stats(raw)})
    old_model, new_model = _models()
    old_dir, new_dir = _export(old_model, tmp_path / "old"), _export(new_model, tmp_path / "new")
    common = ["--window", *map(str, window), "--quiet"]

    assert main(["predict", f"{store.url}/mni", "--model", new_dir, "--region", "20:24", *common]) == 2  # nothing to refresh yet
    assert "no saved prediction" in capsys.readouterr().err and store.label_names("mni") == []

    assert main(["predict", f"{store.url}/mni", "--model", old_dir, *common]) == 0
    capsys.readouterr()
    assert main(["predict", f"{store.url}/mni", "--model", new_dir, "--region", "20:24,10:60", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["versions"] == {"pred": 2, "uncertainty": 2}
    assert summary["region"] == [[20, 24], [10, 60], [0, 80]]
    touched, _ = _touched_chunks(store, "mni", "pred", (slice(20, 24), slice(10, 60), slice(0, 80)))
    assert 0 < summary["chunks_written"]["pred"] <= touched

    image = np.asarray(NormalisedArray(raw, percentile_windows(store.case_attrs("mni")["intensity"])))
    expected = predict(new_model, image, volume.spacing, window=window, region=slab)
    saved, before = (store.read_label("mni", "pred", v).numpy()[0] for v in (2, 1))
    np.testing.assert_array_equal(saved[expected.region], expected.labels)
    saved[expected.region] = before[expected.region]
    np.testing.assert_array_equal(saved, before)

    assert main(["predict", f"{store.url}/mni", "--model", new_dir, "--region", "30:32", "--base-version", "1", *common]) == 0
    assert json.loads(capsys.readouterr().out)["versions"] == {"pred": 3, "uncertainty": 3}
    provenance = json.loads(store.label_versions("mni", "pred")[-1]["message"].removeprefix("prediction "))
    assert provenance["base_versions"] == {"pred": 1, "uncertainty": 1} and provenance["region"] == [[30, 32], [0, 64], [0, 80]]

    assert main(["predict", f"{store.url}/mni", "--model", new_dir, "--region", "20:24", "--out", str(tmp_path / "nii"), *common]) == 2
    assert "--region saves into the store" in capsys.readouterr().err
