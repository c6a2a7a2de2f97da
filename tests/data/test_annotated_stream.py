"""PatchStream on partially annotated label versions (a few reviewed slices of the MNI152 gray matter).

A version saved with ``annotated=`` is known only inside its mask: every patch must hold
annotated voxels, ``batch["annotated"]`` must be the stored mask of the patch's window, and
the label-weighted sampler must centre on annotated foreground only, never on the garbage
(here: all background) that fills the rest of the version.
"""

from __future__ import annotations

import numpy as np
import pytest

from spadkit.data import DatasetSource, LabelSampler, PatchStream, UniformSampler
from spadkit.data.patches import overlapping_start
from spadkit.data.reader import CaseReader
from spadkit.errors import SpadkitError
from spadkit.ingest import intensity_stats
from spadkit.io import OMEZarrStore
from spadkit.volume import LabelVolume, Volume
from tests.data.conftest import expected_window
from tests.mni_gm import mni_crop

SHAPE = (32, 64, 64)
#: the two axial slices a person reviewed
SLICES = (9, 22)


def slice_mask(shape=SHAPE, slices=SLICES) -> np.ndarray:
    """``(Z, Y, X)`` bool, True on the given axial slices."""
    mask = np.zeros(shape, bool)
    mask[list(slices)] = True
    return mask


def mni_store(url: str, labels_outside: str = "background", slices=SLICES, shape=SHAPE) -> tuple[OMEZarrStore, np.ndarray]:
    """A store with case ``brain``: an MNI152 T1 crop whose label ``seg`` has version 1 with the true gray
    matter everywhere (no mask) and version 2 true on ``slices`` only, annotated there, with
    ``labels_outside`` elsewhere ("background": all 0, "truth": the true labels, "noise": random classes).

    Returns the store and the true labels ``(Z, Y, X)``.
    """
    image, truth = mni_crop(shape)
    volume = Volume((image * 1000).astype(np.int16), modality="MR")
    store = OMEZarrStore(url, mode="a")
    full = LabelVolume(truth[None].astype(np.uint8), volume.affine, classes={0: "background", 1: "gray matter"})
    store.write_case("brain", volume, full, attrs={"intensity": intensity_stats(volume, full)})
    known = slice_mask(shape, slices)
    outside = {"background": np.zeros_like(truth), "truth": truth, "noise": np.random.default_rng(5).integers(0, 2, truth.shape)}[labels_outside]
    partial = np.where(known, truth, outside).astype(np.uint8)
    store.save_label("brain", LabelVolume(partial[None], volume.affine), annotated=known, message="two reviewed slices")
    return store, truth


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[OMEZarrStore, np.ndarray]:
    return mni_store(str(tmp_path_factory.mktemp("annotated") / "mni.zarr"))


def stream(url: str, sampler=None, **kwargs) -> PatchStream:
    args = {"patch_size": (8, 16, 16), "batch_size": 2, "samples_per_case": 12, "intensity": "none", "num_threads": 0, "seed": 1, "rank": 0, "world_size": 1}
    return PatchStream([DatasetSource(url, label="seg")], sampler=sampler or UniformSampler(), **(args | kwargs))


def batches(s: PatchStream) -> list[dict]:
    return list(s)


# ---------------------------------------------------------------------------------- samplers
def test_overlapping_start_holds_the_voxel_and_reaches_every_window_around_it():
    rng = np.random.default_rng(0)
    voxel, patch = np.array([[3, 40, 0]]), np.array([8, 16, 16])
    starts = np.array([overlapping_start((10, 50, 50), patch, voxel, rng) for _ in range(2000)])
    assert np.all((starts <= voxel) & (voxel < starts + patch))
    assert starts.min(axis=0).tolist() == [0, 25, 0] and starts.max(axis=0).tolist() == [2, 34, 0]  # clamped inside
    assert np.all(starts + patch <= (10, 50, 50))
    with pytest.raises(ValueError, match="no annotated voxel"):
        overlapping_start((10, 50, 50), (8, 16, 16), np.zeros((0, 3), np.int32), rng)


def test_label_sampler_centres_on_annotated_voxels_when_not_on_foreground():
    rng = np.random.default_rng(1)
    annotated = np.array([[5, 5, 5], [30, 30, 30]])
    starts = [LabelSampler(foreground_ratio=0.0).start((40, 40, 40), (8, 8, 8), rng, {}, annotated) for _ in range(200)]
    assert {tuple(s) for s in starts} == {(1, 1, 1), (26, 26, 26)}
    assert UniformSampler().start((40, 40, 40), (8, 8, 8), rng, None, None) is not None  # None: fully annotated


# ---------------------------------------------------------------------------------- stream
@pytest.mark.parametrize("sampler", [UniformSampler(), LabelSampler(0.5)], ids=["uniform", "label"])
def test_every_patch_holds_annotated_voxels_and_its_mask_is_the_stored_one(store, sampler):
    store, truth = store
    got = batches(stream(store.url, sampler))
    known = slice_mask()
    for batch in got:
        assert batch["annotated"].shape == batch["label"].shape and batch["annotated"].dtype.is_floating_point is False
        for i, start in enumerate(batch["start"].tolist()):
            window = expected_window(known[None].astype(np.float64), start, (8, 16, 16), [0.0])[0].astype(bool)
            np.testing.assert_array_equal(batch["annotated"][i, 0].numpy(), window)
            assert window.any()  # never a patch without anything to learn from
            labels = expected_window(truth[None].astype(np.float64), start, (8, 16, 16), [0.0])[0]
            np.testing.assert_array_equal(batch["label"][i, 0].numpy()[window], labels[window])


def test_label_sampler_centres_foreground_patches_on_annotated_gray_matter_only(tmp_path):
    """Noise (random classes) outside the mask: a sampler reading it would centre patches there."""
    store, truth = mni_store(str(tmp_path / "noise.zarr"), labels_outside="noise")
    s = stream(store.url, LabelSampler(1.0), patch_size=(1, 8, 8))
    for batch in batches(s):
        assert all(bool((label & known).any()) for label, known in zip(batch["label"].bool(), batch["annotated"]))
    gray = truth.astype(bool) & slice_mask()
    index = CaseReader(s.cases[0][0], store, s.cache, "none", s.selections[0][0]).label_index()
    assert set(map(tuple, index.classes[1].tolist())) <= set(map(tuple, np.argwhere(gray).tolist()))
    assert index.counts[1] == gray.sum() and index.annotated_count == slice_mask().sum()


def test_a_fully_annotated_version_behaves_as_before(tmp_path):
    """Version 1 (no mask) of a fresh store: annotated everywhere, uniform windows over the whole volume."""
    image, truth = mni_crop(SHAPE)
    volume = Volume((image * 1000).astype(np.int16), modality="MR")
    label = LabelVolume(truth[None].astype(np.uint8))
    plain = OMEZarrStore(str(tmp_path / "plain.zarr"), mode="a")
    plain.write_case("brain", volume, label, attrs={"intensity": intensity_stats(volume, label)})
    got = batches(stream(plain.url, samples_per_case=40))
    assert all(bool(b["annotated"].all()) for b in got)
    z_starts = {s[0] for b in got for s in b["start"].tolist()}
    assert len(z_starts) > 10  # all over the volume, not just near two slices


def test_the_version_is_pinned_when_the_stream_is_made(tmp_path):
    store, _ = mni_store(str(tmp_path / "m.zarr"))
    s = stream(store.url)
    assert s.selections[0][0].version == 2 and s.selections[0][0].masked
    store.save_label("brain", LabelVolume(np.ones((1, *SHAPE), np.uint8), store.read_image("brain").affine), message="all ones")
    batch = next(iter(s))
    assert not (batch["label"][~batch["annotated"]]).any()  # still version 2: 0 outside its mask
    assert not bool(batch["annotated"].all())


def test_a_coarser_level_counts_a_voxel_annotated_only_when_its_whole_block_is(tmp_path):
    store, _ = mni_store(str(tmp_path / "m.zarr"), slices=(8, 9, 20), shape=(48, 96, 96))
    assert store.case_attrs("brain")["pyramid_factors_zyx"][1] == [2, 2, 2]
    s = PatchStream([DatasetSource(store.url, label="seg", level=1)], patch_size=(4, 8, 8), num_threads=0, intensity="none", rank=0, world_size=1)
    reader = CaseReader(s.cases[0][0], store, s.cache, "none", s.selections[0][0])
    assert np.flatnonzero(reader.annotated.rows()).tolist() == [4]  # slices 8 and 9 make level-1 slice 4; 20 alone leaves 10 unknown
    for batch in batches(s):
        for known, start in zip(batch["annotated"][:, 0], batch["start"].tolist()):
            assert (np.flatnonzero(known.any(dim=2).any(dim=1).numpy()) + start[0]).tolist() == [4]


def test_an_empty_annotated_mask_fails_when_the_stream_is_made_naming_case_and_version(tmp_path):
    store, _ = mni_store(str(tmp_path / "m.zarr"))
    affine = store.read_image("brain").affine
    store.save_label("brain", LabelVolume(np.zeros((1, *SHAPE), np.uint8), affine), annotated=np.zeros(SHAPE, bool))
    with pytest.raises(SpadkitError, match=r"case brain: label 'seg' version 3 has an empty annotated mask") as info:
        stream(store.url)
    assert "Fix:" in str(info.value)


def test_annotated_classes_beyond_the_model_fail_at_check_time_garbage_outside_does_not(tmp_path):
    store, truth = mni_store(str(tmp_path / "m.zarr"))
    affine = store.read_image("brain").affine
    unknown = np.where(slice_mask(), truth, 255).astype(np.uint8)  # 255 = "unlabelled", outside the mask only
    store.save_label("brain", LabelVolume(unknown[None], affine), annotated=slice_mask())
    stream(store.url).check_inputs(in_chans=1, num_classes=2)
    three = np.where(slice_mask(), truth * 2, 0).astype(np.uint8)  # gray matter labelled 2 on the reviewed slices
    store.save_label("brain", LabelVolume(three[None], affine), annotated=slice_mask())
    with pytest.raises(SpadkitError, match=r"case brain: label 'seg' version 4 holds class\(es\) \[2\](?s:.*)num_classes=3"):
        stream(store.url).check_inputs(in_chans=1, num_classes=2)
    with pytest.raises(SpadkitError, match="case brain has 1-channel images, the model takes in_chans=2"):
        stream(store.url).check_inputs(in_chans=2)
