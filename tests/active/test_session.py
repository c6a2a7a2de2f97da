"""AnnotationSession on the MNI152 T1 at 2 mm: saving first, the annotated region, undo/redo, splits, suggestions, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spadkit.active import AnnotationSession, annotated_mask, region_mask
from spadkit.active import features_cache as cache
from spadkit.active import session as session_module
from spadkit.active.history import decode, encode
from spadkit.errors import SpadkitError, StoreError
from spadkit.io.omezarr import OMEZarrStore
from spadkit.models import create_model
from spadkit.volume import LabelVolume
from tests.active.conftest import truth_slice
from tests.mni_session import CASE, tiny_model

SHAPE = Z, Y, X = (95, 117, 99)  # the MNI152 T1 at 2 mm


def test_cold_start_predicts_uniform_and_suggests_a_tissue_slice(store, label_name):
    session = AnnotationSession(store, CASE, tiny_model(), label_name)
    assert session.startup["features_from_cache"]
    shown = session.predict((slice(45, 47),))
    assert shown.probs.shape == (2, 2, Y, X) and shown.region == (slice(45, 47), slice(0, Y), slice(0, X))
    np.testing.assert_allclose(shown.uncertainty, math.log(2), rtol=1e-5)
    hint = session.suggest_next()
    assert hint.reason.startswith("cold start") and 0 < hint.score <= 1
    centre = SHAPE[hint.axis] / 2
    assert abs(hint.index - centre) < 0.3 * SHAPE[hint.axis]  # the slice with most tissue is central, not an edge


def test_the_version_is_saved_before_learning_and_records_who_what_where(store, truth, label_name, monkeypatch):
    session = AnnotationSession(store, CASE, tiny_model(), label_name, author="ann")

    def broken(*args, **kwargs):
        raise RuntimeError("the light head crashed")

    monkeypatch.setattr(session_module, "fit_light_head", broken)
    with pytest.raises(RuntimeError, match="crashed"):
        session.submit_correction("y", 60, truth_slice(truth, 1, 60))
    [version] = store.label_versions(CASE, label_name)
    record = decode(version["message"])
    assert version["author"] == "ann" and version["time"]
    assert record["item"] == {"axis": 1, "index": 60, "split": "train"}
    assert record["voxels_changed"] == int(truth[:, 60].sum()) > 0
    assert record["model"] == cache.model_hash(session.model)
    assert record["annotated"] == [record["item"]]
    np.testing.assert_array_equal(store.read_label(CASE, label_name).numpy()[0][:, 60], truth[:, 60])


def test_only_the_annotated_region_trains_the_head_and_the_visible_region_is_refreshed(store, truth, label_name, monkeypatch):
    seen = []
    real = session_module.fit_light_head
    monkeypatch.setattr(session_module, "fit_light_head", lambda f, labels, mask, **kw: seen.append(np.asarray(mask).copy()) or real(f, labels, mask, **kw))
    session = AnnotationSession(store, CASE, tiny_model(), label_name)
    session.predict((slice(50, 51),))
    first = session.submit_correction(0, 50, truth_slice(truth, 0, 50))
    assert seen[-1].sum() == Y * X and seen[-1][50].all()  # the slice only: nothing else counts as background
    assert first.prediction is not None and first.prediction.region[0] == slice(50, 51)
    assert first.prediction.model.endswith(f"/head@v{first.version}")
    assert first.edit_dice is None  # cold start: no prediction was shown
    second = session.submit_correction(2, 49, truth_slice(truth, 2, 49))
    assert second.edit_dice is not None and 0 <= second.edit_dice <= 1 and 0 <= second.changed_fraction <= 1
    assert seen[-1].sum() == Y * X + Z * Y - Y
    assert session.annotated.sum() == seen[-1].sum()
    assert set(second.timings) >= {"save_s", "fit_s", "predict_s", "refresh_s"}


def test_undo_and_redo_write_new_versions_and_restore_content_and_region(store, truth, label_name):
    session = AnnotationSession(store, CASE, tiny_model(), label_name, steps=5)
    session.submit_correction(0, 40, truth_slice(truth, 0, 40))
    after_a = session.label.copy()
    session.submit_correction(1, 55, truth_slice(truth, 1, 55))
    after_b = session.label.copy()
    undone = session.undo()
    np.testing.assert_array_equal(store.read_label(CASE, label_name).numpy()[0], after_a)
    assert [i["axis"] for i in session.items] == [0] and undone.voxels_changed == int((after_a != after_b).sum())
    session.redo()
    np.testing.assert_array_equal(session.label, after_b)
    session.undo()
    session.undo()
    assert not session.label.any() and session.items == [] and session.head is None
    with pytest.raises(SpadkitError, match="nothing to undo"):
        session.undo()
    session.redo()
    session.submit_correction(2, 45, truth_slice(truth, 2, 45))  # a new correction clears the redo stack
    with pytest.raises(SpadkitError, match="nothing to redo"):
        session.redo()
    ops = [row["op"] for row in session.history()]
    assert ops == ["correction", "correction", "undo", "redo", "undo", "undo", "redo", "correction"]
    assert len(store.label_versions(CASE, label_name)) == 8  # nothing was deleted


def test_the_validation_split_is_fixed_once_per_slice(store, truth, label_name):
    session = AnnotationSession(store, CASE, tiny_model(), label_name, steps=5)
    slices = [(0, 35), (0, 55), (1, 50), (2, 30), (2, 65)]
    for axis, index in slices:
        session.submit_correction(axis, index, truth_slice(truth, axis, index))
    splits = {(i["axis"], i["index"]): i["split"] for i in session.items}
    assert [splits[s] for s in slices] == ["train", "train", "validation", "train", "train"]
    assert session.validation_dice() is not None
    session.undo()
    session.submit_correction(1, 50, truth_slice(truth, 1, 50))  # corrected again: still validation
    session.submit_correction(2, 65, truth_slice(truth, 2, 65))
    again = {(i["axis"], i["index"]): i["split"] for i in session.items}
    assert again == splits
    train = region_mask(session.items, SHAPE, "train")
    assert session.annotated[60, 50, 10] and not train[60, 50, 10]  # the validation slice never trains the head


def test_a_3d_box_correction_marks_only_its_box_as_reviewed(store, truth, label_name):
    session = AnnotationSession(store, CASE, tiny_model(), label_name, steps=5)
    box = (slice(45, 50), slice(50, 70), slice(40, 60))
    session.submit_correction(None, None, truth[box], region=box)
    assert session.annotated.sum() == 5 * 20 * 20 and session.annotated[box].all()
    with pytest.raises(SpadkitError, match="mask has shape"):
        session.submit_correction(None, None, truth[box][:3], region=box)


def test_suggestions_skip_corrected_slices_and_spread_out(store, truth, label_name):
    session = AnnotationSession(store, CASE, tiny_model(), label_name, steps=20)
    picked = []
    for _ in range(3):
        hint = session.suggest_next()
        picked.append((hint.axis, hint.index))
        session.submit_correction(hint.axis, hint.index, truth_slice(truth, hint.axis, hint.index))
    assert len(set(picked)) == 3
    ranked = session.suggest_next(top=10)
    assert not {(s.axis, s.index) for s in ranked} & set(picked)
    assert "uncertainty" in ranked[0].reason and "diversity" in ranked[0].reason
    assert [s.score for s in ranked] == sorted((s.score for s in ranked), reverse=True)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 50, np.zeros((Y, X - 1), bool)), "mask has shape"),
        ((0, 50, np.zeros((Y, X), np.float32)), "bool or integer"),
        ((3, 50, np.zeros((Y, X), bool)), "axis 3"),
        ((0, Z, np.zeros((Y, X), bool)), "outside the z axis"),
        ((1, -1, np.zeros((Z, X), bool)), "outside the y axis"),
        ((2, 5, np.full((Z, Y), 2)), "outside 0..1"),
    ],
)
def test_bad_corrections_are_refused_before_anything_is_written(store, label_name, args, match):
    session = AnnotationSession(store, CASE, tiny_model(), label_name)
    with pytest.raises(SpadkitError, match=match) as info:
        session.submit_correction(*args)
    assert info.value.fix
    assert label_name not in store.label_names(CASE)


def test_a_read_only_store_predicts_and_suggests_but_refuses_corrections(mni_store, label_name):
    store = OMEZarrStore(str(mni_store[0]), mode="r")
    model = tiny_model()
    path = cache.feature_path(store, CASE, cache.model_hash(model))
    path.rename(path.with_suffix(".moved"))
    try:
        session = AnnotationSession(store, CASE, model, label_name)
        assert not path.exists()  # nothing is written into a store opened read-only
    finally:
        path.with_suffix(".moved").rename(path)
    session.suggest_next()
    with pytest.raises(StoreError, match="read-only"):
        session.submit_correction(0, 50, np.zeros((Y, X), bool))
    assert label_name not in store.label_names(CASE)


def test_a_model_with_other_channels_is_refused(store, label_name):
    torch.manual_seed(0)
    with pytest.raises(SpadkitError, match="2-channel images, case mni has 1") as info:
        AnnotationSession(store, CASE, create_model("spad_vit_test", in_chans=2), label_name)
    assert "in_chans=1" in info.value.fix


def test_a_deleted_or_damaged_feature_cache_is_recomputed(store, label_name):
    model = tiny_model()
    path = cache.feature_path(store, CASE, cache.model_hash(model))
    reference = AnnotationSession(store, CASE, model, label_name).features
    path.unlink()
    rebuilt = AnnotationSession(store, CASE, model, label_name)
    assert not rebuilt.startup["features_from_cache"] and path.is_file()
    torch.testing.assert_close(rebuilt.features.tokens, reference.tokens)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="unreadable feature cache"):
        again = AnnotationSession(store, CASE, model, label_name)
    assert not again.startup["features_from_cache"]
    assert AnnotationSession(store, CASE, model, label_name).startup["features_from_cache"]


@pytest.mark.slow
def test_a_segmentation_model_predicts_the_first_slice_and_its_edit_dice_is_recorded(store, truth, label_name):
    torch.manual_seed(0)
    unetr = create_model("spad_unetr_test")
    with pytest.raises(SpadkitError, match="predicts 2 classes"):
        AnnotationSession(store, CASE, unetr, label_name, num_classes=3)
    session = AnnotationSession(store, CASE, unetr, label_name, steps=5)
    shown = session.predict((slice(50, 51),))
    assert shown.model == session.backbone_version and not np.allclose(shown.probs, 0.5)
    first = session.submit_correction(0, 50, truth_slice(truth, 0, 50))
    assert first.edit_dice is not None and first.changed_fraction == pytest.approx(float((shown.labels[0] != truth[50]).mean()))


def test_annotated_mask_reads_the_reviewed_voxels_of_a_version(store, truth, label_name):
    session = AnnotationSession(store, CASE, tiny_model(), label_name, steps=5)
    store.save_label(CASE, LabelVolume(truth, store.read_image(CASE).affine), label_name, message="ingested")
    assert annotated_mask(store, CASE, label_name) is None  # not a session version
    first = session.submit_correction(1, 40, truth_slice(truth, 1, 40))
    session.submit_correction(2, 50, truth_slice(truth, 2, 50))
    np.testing.assert_array_equal(annotated_mask(store, CASE, label_name), session.annotated)
    assert annotated_mask(store, CASE, label_name, first.version).sum() == Z * X


def test_the_store_records_the_annotated_voxels_of_every_version_and_old_versions_still_read(store, truth, label_name):
    session = AnnotationSession(store, CASE, tiny_model(), label_name, steps=5)
    session.submit_correction(0, 40, truth_slice(truth, 0, 40))
    session.submit_correction(2, 50, truth_slice(truth, 2, 50))
    session.undo()
    session.redo()
    session.undo()
    session.undo()
    for entry in store.label_versions(CASE, label_name):
        stored = np.asarray(store.read_annotated(CASE, label_name, entry["version"])[...], bool)
        np.testing.assert_array_equal(stored, region_mask(decode(entry["message"])["annotated"], SHAPE))
    assert not session.annotated.any() and store.read_annotated(CASE, label_name) is not None  # all undone: nothing reviewed
    record = {"op": "correction", "item": {"axis": 1, "index": 60, "split": "train"}, "parent": 0, "annotated": [{"axis": 1, "index": 60, "split": "train"}]}
    label = np.zeros(SHAPE, np.int32)
    label[:, 60] = truth[:, 60]
    store.save_label(CASE, LabelVolume(label, store.read_image(CASE).affine), label_name, message=encode(record))  # as sessions saved before masks
    old = AnnotationSession(store, CASE, tiny_model(), label_name, steps=5)
    assert store.read_annotated(CASE, label_name) is None
    assert old.annotated.sum() == Z * X and old.annotated[:, 60].all()
    np.testing.assert_array_equal(annotated_mask(store, CASE, label_name), old.annotated)


@pytest.mark.parametrize(
    ("region", "match"),
    [((slice(0, Z + 5),), "outside the z axis"), ((slice(10, 10),), "or empty"), ((slice(0, 5), slice(0, 5), slice(0, 5), slice(0, 1)), "at most 3 axes"), ((slice(0, 4, 2),), "outside")],
)
def test_a_bad_region_is_refused_with_a_fix(store, label_name, region, match):
    session = AnnotationSession(store, CASE, tiny_model(), label_name)
    with pytest.raises(SpadkitError, match=match) as info:
        session.predict(region)
    assert info.value.fix and session.visible is None
