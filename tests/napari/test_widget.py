"""The annotation dock widget in a real viewer: buttons pressed with qtbot, layers, dims and the store checked.

The case is nilearn's MNI152 T1 at 2 mm (95, 117, 99) in a tmp store with the tiny model's
features cached (the session's ``mni_store``, shared with tests/active); the annotator's truth is its gray matter
(probability > 0.5). A correction is written into the session's labels layer with
``Labels.data_setitem`` (:func:`~spadkit_napari._annotation.write_slice`), the call napari's
paint and fill tools make.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
from napari.layers import Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QApplication
from spadkit_napari._annotation import DIMS_ORDER, show_slice, slice_on_screen, write_slice
from spadkit_napari._geometry import layer_transform
from spadkit_napari._stall import StallProbe
from spadkit_napari._widgets import AnnotationWidget

from spadkit.active.history import decode
from spadkit.io import OMEZarrStore
from tests.mni_session import CASE
from tests.napari.conftest import save_screenshot

pytestmark = pytest.mark.gui

#: The longest the GUI may stop answering while Learn runs (ms). Measured on 2 shared cores under
#: load (README, napari section): 66-350 ms, a single redraw of the window (Mesa, Xvfb) 100-130 ms;
#: the same submission run in the GUI thread stalls for all of its 0.6-3 s.
STALL_BOUND_MS = 500


def click(qtbot, widget: AnnotationWidget, button, timeout_ms: int = 60_000) -> None:
    """Press ``button`` with the mouse and wait until the widget's worker is done."""
    qtbot.mouseClick(button.native, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: widget.busy is None, timeout=timeout_ms)


def open_widget(viewer, qtbot, store: Path, label: str) -> AnnotationWidget:
    """The plugin's dock widget (from the npe2 manifest) with a session opened on the MNI152 case."""
    _, widget = viewer.window.add_plugin_dock_widget("spadkit", "Annotate")
    widget.store_path.value = store
    widget.case.value, widget.label_name.value, widget.model.value = CASE, label, "spad_vit_test"
    click(qtbot, widget, widget.open_button)
    assert widget.session is not None, widget.status.value
    return widget


def correct(layer: Labels, axis: int, index: int, truth: np.ndarray) -> None:
    """Correct the slice to the truth as napari's fill/paint tools do (edit history, refresh)."""
    write_slice(layer, axis, index, np.take(truth, index, axis=axis))


def test_learn_submits_the_slice_on_screen_and_the_viewer_keeps_responding(make_napari_viewer, qtbot, mni_store):
    store_path, truth = mni_store
    viewer = make_napari_viewer(show=True)
    widget = open_widget(viewer, qtbot, store_path, "learn")
    store = OMEZarrStore(str(store_path))
    image = viewer.layers[CASE]
    placed = layer_transform(store.read_image(CASE).affine)
    for layer in (image, *widget.layers.values()):  # radiological like the reader: negative 2 mm scales
        np.testing.assert_allclose(layer.scale, (-2.0, -2.0, -2.0))
        np.testing.assert_allclose(layer.translate, placed["translate"])
    assert [layer.name for layer in viewer.layers] == [CASE, f"{CASE} probability", f"{CASE} uncertainty", "learn (session)"]
    labels = widget.layers["labels"]
    assert widget.corrections.value == labels  # (magicgui hands back a proxy of the layer, not the layer)
    assert labels.data.shape == truth.shape == (95, 117, 99)

    axis, z = slice_on_screen(viewer, labels)
    assert (axis, z) == (0, 47)  # napari starts on the middle axial slice
    click(qtbot, widget, widget.predict_button)
    uncertainty = widget.layers["uncertainty"].data
    np.testing.assert_allclose(uncertainty[z], math.log(2), rtol=1e-5)  # no correction yet: a uniform guess
    assert not uncertainty[z + 1].any()  # only the slice on screen was predicted

    correct(labels, 0, z, truth)
    with StallProbe(interval_ms=10) as learning:
        click(qtbot, widget, widget.learn_button)
    with StallProbe(interval_ms=10) as frame:  # the floor: one redraw of the window, nothing else running
        viewer.dims.set_point(0, labels.data_to_world((z + 1, 0, 0))[0])
        qtbot.wait(200)
    viewer.dims.set_point(0, labels.data_to_world((z, 0, 0))[0])
    print(f"\nLearn: longest GUI stall {learning.max_ms:.0f} ms ({len(learning.gaps_ms)} ticks); one redraw {frame.max_ms:.0f} ms")
    assert learning.max_ms < STALL_BOUND_MS, learning

    [version] = store.label_versions(CASE, "learn")
    assert decode(version["message"])["item"] == {"axis": 0, "index": z, "split": "train"}
    saved = store.read_label(CASE, "learn").numpy()[0]
    np.testing.assert_array_equal(saved[z], truth[z])
    assert not saved[:z].any() and not saved[z + 1 :].any()
    assert widget.history.data[0][:2] == ["correction", f"z {z}"]
    assert "Learned z slice 47" in widget.status.value
    # the light head learned the slice: the prediction on screen is sure of itself and right
    assert uncertainty[z].mean() < 0.5 * math.log(2)
    np.testing.assert_array_equal(labels.data[z], truth[z])  # reviewed voxels show the correction

    # the baseline: the same kind of submission run in the GUI thread freezes the viewer throughout
    with StallProbe(interval_ms=10) as blocking:
        widget.session.submit_correction(0, z + 10, truth[z + 10])
        QApplication.processEvents()
    print(f"the same submission in the GUI thread: {blocking.max_ms:.0f} ms")
    assert learning.max_ms < blocking.max_ms / 2, (learning, blocking)


def test_a_stall_probe_sees_a_blocked_event_loop_and_not_an_idle_one(qtbot):
    with StallProbe(interval_ms=10) as idle:
        qtbot.wait(300)
    with StallProbe(interval_ms=10) as blocked:
        qtbot.wait(50)
        time.sleep(0.5)  # work in the GUI thread
        QApplication.processEvents()
    assert idle.max_ms < 250 < 500 <= blocked.max_ms, (idle, blocked)
    assert len(idle.gaps_ms) > 10 and blocked.stalls(250) == 1


def test_next_slice_moves_the_viewer_and_undo_redo_and_resume_follow_the_store(make_napari_viewer, qtbot, mni_store):
    store_path, truth = mni_store
    viewer = make_napari_viewer(show=True)
    widget = open_widget(viewer, qtbot, store_path, "next")
    labels = widget.layers["labels"]
    correct(labels, 0, 47, truth)
    click(qtbot, widget, widget.learn_button)

    expected = widget.session.suggest_next()
    click(qtbot, widget, widget.next_button)
    assert tuple(viewer.dims.order) == DIMS_ORDER[expected.axis]
    assert slice_on_screen(viewer, labels) == (expected.axis, expected.index)
    assert expected.reason in widget.status.value
    assert np.take(widget.layers["uncertainty"].data, expected.index, axis=expected.axis).any()  # predicted there

    correct(labels, expected.axis, expected.index, truth)
    click(qtbot, widget, widget.learn_button)
    second = widget.session.history()[-1]
    assert widget.history.data[1][:3] == ["correction", f"{'zyx'[expected.axis]} {expected.index}", f"{second['edit_dice']:.3f}"]
    assert second["edit_dice"] > 0.5  # the head had learned from slice 47 before this correction

    click(qtbot, widget, widget.undo_button)
    store = OMEZarrStore(str(store_path))
    assert [decode(v["message"])["op"] for v in store.label_versions(CASE, "next")] == ["correction", "correction", "undo"]
    np.testing.assert_array_equal(store.read_label(CASE, "next").numpy(), store.read_label(CASE, "next", version=1).numpy())
    assert widget.redo_button.enabled and widget.history.data[2][:2] == ["undo", "v2"]
    click(qtbot, widget, widget.redo_button)
    np.testing.assert_array_equal(np.take(labels.data, expected.index, axis=expected.axis), np.take(truth, expected.index, axis=expected.axis))

    other = make_napari_viewer(show=True)
    resumed = open_widget(other, qtbot, store_path, "next")
    assert "resumed" in resumed.status.value and resumed.history.shape[0] == 4
    np.testing.assert_array_equal(resumed.layers["labels"].data[47], truth[47])


def test_a_labels_layer_off_the_grid_or_a_3d_view_is_refused_and_nothing_is_saved(make_napari_viewer, qtbot, mni_store):
    store_path, truth = mni_store
    viewer = make_napari_viewer(show=True)
    viewer.open(str(store_path / CASE), plugin="spadkit")
    _, widget = viewer.window.add_plugin_dock_widget("spadkit", "Annotate")
    assert (widget.store_path.value, widget.case.value) == (store_path, CASE)  # taken from the reader's layer
    widget.label_name.value, widget.model.value = "refused", "spad_vit_test"
    click(qtbot, widget, widget.open_button)
    assert viewer.layers[CASE].metadata["spadkit"]["case"] == CASE
    assert sum(layer.name == CASE for layer in viewer.layers) == 1  # the image the reader opened is reused

    fine = viewer.add_labels(truth.astype(np.uint8), name="1 mm draft", scale=(-1.0, -1.0, -1.0))
    widget.corrections.value = fine
    click(qtbot, widget, widget.learn_button)
    assert "'1 mm draft' (shape (95, 117, 99), scale (-1, -1, -1) mm) is not on the grid of case mni" in widget.status.value
    assert "scale (-2, -2, -2) mm); nothing was submitted" in widget.status.value and "New labels layer" in widget.status.value

    widget.corrections.value = widget.layers["labels"]
    for layer in viewer.layers:
        layer.visible = False  # software rendering of volumes in 3D is slow and not what is tested
    viewer.dims.ndisplay = 3
    click(qtbot, widget, widget.learn_button)
    assert "the viewer shows 3D" in widget.status.value
    assert "refused" not in OMEZarrStore(str(store_path)).label_names(CASE)


@pytest.mark.slow  # two fine-tune processes (forkserver start, torch import, a few UNETR steps): ~1 min on 2 busy cores
def test_learn_then_fine_tunes_in_another_process_with_progress_and_cancel(make_napari_viewer, qtbot, mni_store, two_token_crops):
    store_path, truth = mni_store
    viewer = make_napari_viewer(show=True)
    widget = open_widget(viewer, qtbot, store_path, "full")
    labels = widget.layers["labels"]
    widget.finetune.value, widget.finetune_steps.value = True, 2
    for axis, index in [(0, 40), (1, 55), (2, 50)]:  # two training slices and one validation slice, one per view
        show_slice(viewer, labels, axis, index)
        correct(labels, axis, index, truth)
        click(qtbot, widget, widget.learn_button, timeout_ms=300_000)  # the first fine-tune starts the fork server
    assert "Fine-tune not started" not in widget.status.value, widget.status.value
    assert widget.job is not None and widget.job.process.pid != os.getpid()
    assert widget.cancel_button.enabled and widget.progress.max == 2
    with StallProbe(interval_ms=10) as probe:
        qtbot.waitUntil(lambda: widget.job is None and widget.busy is None, timeout=300_000)
    print(f"\nwhile fine-tuning: longest GUI stall {probe.max_ms:.0f} ms over {len(probe.gaps_ms)} ticks; {widget.status.value}")
    assert widget.status.value.startswith("Fine-tune done: ") and "validation Dice" in widget.status.value
    row = widget.session.history()[-1]
    assert row["op"] == "finetune" and row["steps"] == 2
    assert widget.history.data[widget.history.shape[0] - 1][:2] == ["finetune", "accepted" if row["accepted"] else "rejected"]

    widget.finetune_steps.value = 500
    show_slice(viewer, labels, 0, 60)
    correct(labels, 0, 60, truth)
    click(qtbot, widget, widget.learn_button)
    job = widget.job
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=300_000)  # the bar follows the child's steps
    assert job.progress()["state"] == "running"
    qtbot.mouseClick(widget.cancel_button.native, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: widget.job is None and widget.busy is None, timeout=60_000)
    assert not job.running and widget.status.value.startswith("Fine-tune cancelled: kept the previous weights")
    assert widget.history.data[widget.history.shape[0] - 1][:2] == ["finetune", "rejected"]


@pytest.mark.slow  # the MNI152 at 1 mm: store, features and four rounds, ~1 min on 2 busy cores
def test_screenshot_of_the_widget_with_a_prediction_and_its_uncertainty(make_napari_viewer, qtbot, mni_store_full, artifacts):
    store_path, truth = mni_store_full
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1280, 1000)
    widget = open_widget(viewer, qtbot, store_path, "seg")
    labels = widget.layers["labels"]
    for _ in range(3):  # a person correcting the suggested slices
        click(qtbot, widget, widget.next_button)
        axis, index = slice_on_screen(viewer, labels)
        correct(labels, axis, index, truth)
        click(qtbot, widget, widget.learn_button)
    click(qtbot, widget, widget.next_button)
    save_screenshot(viewer, artifacts, "widget_next_slice", canvas_only=False)
    show_slice(viewer, labels, 0, 100)
    click(qtbot, widget, widget.predict_button)
    assert "Predicted z slice 100" in widget.status.value
    shot = save_screenshot(viewer, artifacts, "widget_prediction_uncertainty", canvas_only=False)[..., :3]

    window = viewer.window._qt_window
    canvas, dock = viewer.window._qt_viewer.canvas.native, widget.native
    assert shot.shape[:2] == (window.height(), window.width()) and shot.shape[1] > canvas.width() + dock.width() / 2

    def region(qwidget):
        corner = qwidget.mapTo(window, qwidget.rect().topLeft())
        return shot[corner.y() : corner.y() + qwidget.height(), corner.x() : corner.x() + qwidget.width()]

    brain, panel = region(canvas), region(dock)
    assert (brain.mean(axis=2) > 30).mean() > 0.1 and panel.std() > 20  # neither black: the slice and the widget's text
    # the uncertainty (inferno, additive) glows orange at the tissue borders; the corrections layer colours the gray matter
    warm = (brain[..., 0].astype(int) - brain[..., 2] > 60) & (brain[..., 0] > 120)
    assert warm.sum() > 500, warm.sum()
    assert widget.history.shape[0] == 3 and all(widget.history.data[i][2] != "-" for i in (1, 2))  # edit Dice per round
