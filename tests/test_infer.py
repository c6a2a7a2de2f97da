"""spadkit.infer: sliding windows on the spacing rule, MONAI parity, regions, lazy Zarr in/out, flips, the store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference

from spadkit.errors import SpadkitError
from spadkit.infer import (
    default_window,
    file_sha256,
    importance_map,
    predict,
    save_prediction,
    window_starts,
)
from spadkit.io import OMEZarrStore
from spadkit.models import create_model
from spadkit.volume import Volume
from tests.mni_gm import mni_crop

ISO = (1.0, 1.0, 1.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("spad_unetr_test", num_classes=3).eval()


@pytest.fixture(scope="module")
def image():
    """A real (1, 24, 40, 48) MNI152 crop: not a multiple of the (16, 32, 32) windows along any axis."""
    return mni_crop((24, 40, 48))[0]


def _monai(model, image, spacing, window, overlap):
    with torch.no_grad():
        out = sliding_window_inference(torch.from_numpy(image)[None], window, 1, lambda w: model(w, torch.tensor(spacing)).softmax(1), overlap=overlap, mode="gaussian")
    return out[0].numpy()


def test_windows_follow_monai_and_the_spacing_rule():
    assert window_starts(48, 32, 0.5) == [0, 16]
    assert window_starts(100, 32, 0.25) == [0, 24, 48, 68]
    assert window_starts(20, 32, 0.25) == [0]
    assert default_window((200, 300, 300), ISO) == (96, 96, 96)
    assert default_window((40, 300, 300), (5.0, 0.7, 0.7)) == (24, 96, 96)  # level 2: 4x16x16 patches
    assert default_window((1, 300, 50), ISO) == (1, 96, 64)  # 2D; clamped to the image rounded up to 16
    torch.testing.assert_close(importance_map((16, 32, 1)), compute_importance_map((16, 32, 1), mode="gaussian", sigma_scale=0.125))


@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_equals_monai_sliding_window_inference(model, image, overlap):
    ours = predict(model, image, ISO, window=(16, 32, 32), overlap=overlap)
    assert ours.windows == 8
    np.testing.assert_allclose(ours.probs, _monai(model, image, ISO, (16, 32, 32), overlap), atol=1e-6)


def test_equals_monai_on_a_2d_image(model, image):
    plane = image[:, 20:21]
    ours = predict(model, plane, ISO, window=(1, 32, 32), overlap=0.5)
    np.testing.assert_allclose(ours.probs, _monai(model, plane, ISO, (1, 32, 32), 0.5), atol=1e-6)


def test_one_window_equals_a_whole_volume_forward(model, image):
    crop = image[:, :16, :32, :48]
    with torch.no_grad():
        whole = model(torch.from_numpy(crop)[None], ISO).softmax(1)[0].numpy()
    ours = predict(model, crop, ISO, window=(16, 32, 48))
    assert ours.windows == 1
    np.testing.assert_allclose(ours.probs, whole, atol=1e-6)
    np.testing.assert_array_equal(ours.labels, whole.argmax(0))
    np.testing.assert_allclose(ours.uncertainty, -(whole * np.log(whole)).sum(0), atol=1e-5)


def test_region_equals_the_same_region_of_a_full_prediction(model, image):
    full = predict(model, image, ISO, window=(16, 32, 32), overlap=0.25)
    box = (slice(17, 21), slice(2, 7), slice(None))
    part = predict(model, image, ISO, window=(16, 32, 32), overlap=0.25, region=box)
    assert (part.windows, full.windows) == (2, 8)  # only the windows touching the slab ran
    assert part.probs.shape == (3, 4, 5, 48)
    np.testing.assert_array_equal(part.probs, full.probs[:, 17:21, 2:7])
    np.testing.assert_array_equal(part.labels, full.labels[17:21, 2:7])
    np.testing.assert_array_equal(part.uncertainty, full.uncertainty[17:21, 2:7])


class _CountingArray:
    """A (C, Z, Y, X) zarr array that records the largest block read from it."""

    def __init__(self, array):
        self.array, self.shape, self.largest = array, array.shape, 0

    def __getitem__(self, key):
        block = self.array[key]
        self.largest = max(self.largest, block.size)
        return block


class _RowLog:
    """Wraps an output array and records the Z rows of every write."""

    def __init__(self, array, log, axis):
        self.array, self.log, self.axis = array, log, axis

    def __setitem__(self, key, value):
        self.log.append(key[self.axis])
        self.array[key] = value


def test_reads_zarr_window_by_window_and_writes_chunk_by_chunk(model, tmp_path):
    data = mni_crop((64, 32, 32), origin=(40, 100, 80))[0]
    source = zarr.create_array(tmp_path / "in.zarr", shape=data.shape, chunks=(1, 16, 32, 32), dtype="float32")
    source[:] = data
    reads = _CountingArray(source)
    root = zarr.open_group(tmp_path / "out.zarr", mode="w")
    arrays = {
        "probs": root.create_array("probs", shape=(3, 64, 32, 32), chunks=(3, 16, 32, 32), dtype="float32"),
        "labels": root.create_array("labels", shape=(64, 32, 32), chunks=(16, 32, 32), dtype="uint8"),
        "uncertainty": root.create_array("uncertainty", shape=(64, 32, 32), chunks=(16, 32, 32), dtype="float32"),
    }
    rows: list[slice] = []
    out = {"probs": _RowLog(arrays["probs"], rows, 1), "labels": arrays["labels"], "uncertainty": arrays["uncertainty"]}
    lazy = predict(model, reads, ISO, window=(16, 32, 32), overlap=0.5, out=out)
    assert reads.largest == 16 * 32 * 32  # one window at a time, never the volume
    assert len(rows) > 1 and max(r.stop - r.start for r in rows) <= 16  # finished slabs are written as the scan moves on
    memory = predict(model, data, ISO, window=(16, 32, 32), overlap=0.5)
    np.testing.assert_array_equal(arrays["probs"][:], memory.probs)
    np.testing.assert_array_equal(arrays["labels"][:], memory.labels)
    np.testing.assert_array_equal(arrays["uncertainty"][:], memory.uncertainty)
    assert lazy.region == (slice(0, 64), slice(0, 32), slice(0, 32))


def test_flip_tta_averages_flipped_predictions(model, image):
    crop = image[:, :16, :32, :32]
    tta = predict(model, crop, ISO, window=(16, 32, 32), flips=[(2,), (0, 1)])
    with torch.no_grad():
        x = torch.from_numpy(crop)[None]
        runs = [model(x, ISO), model(x.flip(4), ISO).flip(4), model(x.flip([2, 3]), ISO).flip([2, 3])]
    expected = torch.stack([r.softmax(1) for r in runs]).mean(0)[0].numpy()
    np.testing.assert_allclose(tta.probs, expected, atol=1e-6)
    assert not np.allclose(tta.probs, predict(model, crop, ISO, window=(16, 32, 32)).probs, atol=1e-4)
    assert tta.uncertainty.min() >= 0 and tta.uncertainty.max() <= np.log(3) + 1e-6


def test_flip_variance_uncertainty(model, image):
    crop = image[:, :16, :32, :32]
    flips = [(2,), (1,)]
    out = predict(model, crop, ISO, window=(16, 32, 32), flips=flips, uncertainty="flip_variance")
    with torch.no_grad():
        x = torch.from_numpy(crop)[None]
        runs = torch.stack([model(x, ISO).softmax(1), model(x.flip(4), ISO).flip(4).softmax(1), model(x.flip(3), ISO).flip(3).softmax(1)])[:, 0]
    np.testing.assert_allclose(out.probs, runs.mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(out.uncertainty, runs.var(0, unbiased=False).mean(0).numpy(), atol=1e-6)
    assert out.uncertainty.max() > 0 and out.uncertainty_kind == "flip_variance"
    with pytest.raises(SpadkitError, match="flips=True"):
        predict(model, crop, ISO, uncertainty="flip_variance")


def test_mc_dropout_uncertainty_is_reproducible_per_window(model, image):
    torch.manual_seed(0)
    noisy = create_model("spad_unetr_test", num_classes=3, dropout=0.3).eval()
    crop = image[:, :16, :32, :48]  # two windows along X
    settings = {"window": (16, 32, 32), "uncertainty": "mc_dropout", "mc_samples": 4}
    full = predict(noisy, crop, ISO, **settings)
    assert full.uncertainty_kind == "mc_dropout" and full.uncertainty.max() > 0 and not noisy.dropout.training
    np.testing.assert_allclose(predict(noisy, crop, ISO, batch_size=2, **settings).probs, full.probs, atol=1e-6)
    part = predict(noisy, crop, ISO, region=(slice(None), slice(None), slice(30, 40)), **settings)
    np.testing.assert_allclose(part.probs, full.probs[..., 30:40], atol=1e-6)
    deterministic = predict(noisy, crop, ISO, window=(16, 32, 32))
    assert not np.allclose(deterministic.probs, full.probs, atol=1e-3)
    assert not np.allclose(predict(noisy, crop, ISO, seed=1, **settings).probs, full.probs, atol=1e-3)
    with pytest.raises(SpadkitError, match="dropout=0.1"):
        predict(model, crop, ISO, **settings)


def test_anisotropic_and_2d_inputs_keep_their_grid(model, image):
    thick = image[:, ::5]  # 5 slices of 5 mm at 1 mm in-plane: level 2, 4x16x16 patches
    out = predict(model, thick, (5.0, 1.0, 1.0), flips=True)
    assert out.probs.shape == (3, 5, 40, 48)
    np.testing.assert_allclose(out.probs.sum(0), 1.0, atol=1e-5)
    flat = predict(model, image[:, 10:11], ISO, flips=True)
    assert flat.labels.shape == (1, 40, 48)


def test_bad_input_names_the_fix(model, image):
    with pytest.raises(SpadkitError, match="1-channel"):
        predict(model, np.zeros((2, 16, 16, 16), np.float32), ISO)
    with pytest.raises(SpadkitError, match=r"window=\(16, 32, 32\)"):
        predict(model, image, ISO, window=(10, 20, 32))
    with pytest.raises(SpadkitError, match="overlap"):
        predict(model, image, ISO, overlap=1.0)
    with pytest.raises(SpadkitError, match="empty"):
        predict(model, image, ISO, region=(slice(30, 40),))
    with pytest.raises(SpadkitError, match="spacing"):
        predict(model, image)


def test_save_prediction_writes_label_groups_with_provenance(model, tmp_path):
    data = mni_crop((16, 32, 32))[0]
    store = OMEZarrStore(str(tmp_path / "s.zarr"), mode="a")
    store.write_case("brain", Volume(data, modality="MR"))
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    prediction = predict(model, store.read_image("brain"), flips=True)
    versions = save_prediction(store, "brain", prediction, checkpoint=checkpoint, model_name="spad_unetr_test")
    assert versions == {"pred": 1, "uncertainty": 1}
    np.testing.assert_array_equal(store.read_label("brain", "pred").numpy()[0], prediction.labels)
    percent = store.read_label("brain", "uncertainty").numpy()[0]
    np.testing.assert_array_equal(percent, np.rint(prediction.uncertainty / np.log(3) * 100).astype(np.uint8))
    message = store.label_versions("brain", "pred")[-1]["message"]
    assert json.loads(message.removeprefix("prediction "))["checkpoint_sha256"] == file_sha256(checkpoint)
    part = predict(model, store.read_image("brain"), region=(slice(0, 4),))
    with pytest.raises(SpadkitError, match="whole volume"):
        save_prediction(store, "brain", part)
