"""The ipywidgets Annotator driven as a user would (set sliders, click buttons) on the MNI152 T1 at 2 mm;
each test checks what the session and the store then hold."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk
from skimage.measure import label as connected

from spadkit.active import AnnotationSession, dice
from spadkit.io.omezarr import OMEZarrStore
from spadkit.notebook import Annotator
from spadkit.notebook.tutorial import CASE, mni152_gray_matter, mni152_store
from spadkit.volume import Volume
from tests.mni_session import tiny_model

SHAPE = Z, Y, X = (95, 117, 99)  # the MNI152 T1 at 2 mm


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The template at 2 mm in a store whose feature cache is filled once for the module."""
    url = str(tmp_path_factory.mktemp("annotate") / "s.zarr")
    AnnotationSession(mni152_store(url), CASE, tiny_model(), "warmup")
    return url


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return mni152_gray_matter()


@pytest.fixture
def session(store_url: str, request: pytest.FixtureRequest) -> AnnotationSession:
    """A session with a label map of its own per test."""
    name = "t" + str(abs(hash(request.node.nodeid)) % 10**8)
    return AnnotationSession(OMEZarrStore(store_url, mode="a"), CASE, tiny_model(), name, author="tester")


def saved(session: AnnotationSession) -> np.ndarray:
    """The latest label version in the store, read back from disk."""
    return OMEZarrStore(session.store.url).read_label(CASE, session.label_name).numpy()[0]


def test_opens_on_the_middle_axial_slice_with_an_empty_draft_at_cold_start(session):
    annotator = Annotator(session)
    assert (annotator.axis, annotator.index) == ("axial", Z // 2)
    assert annotator.seed == (Y // 2, X // 2) and annotator.plane().shape == (Y, X)
    assert not annotator.draft.any()  # cold start: a uniform prediction, argmax background
    assert np.shares_memory(annotator.draft, annotator.label.array)  # the draft is the label layer drawn
    assert "Learn" in annotator.status.value
    assert annotator.prediction.region == (slice(Z // 2, Z // 2 + 1), slice(0, Y), slice(0, X))
    picture = np.asarray(Image.open(io.BytesIO(annotator.image_widget.value)).convert("L"))
    assert picture.std() > 30  # a brain on black, not a blank box
    assert "Dice per round" in annotator.dice_figure.axes[0].get_title()
    assert annotator.widget.children[-1] is annotator.dice_plot


def test_threshold_region_tool_adds_the_connected_band_that_holds_the_seed(session):
    annotator = Annotator(session)
    plane = annotator.plane()
    lo, hi = np.percentile(plane[plane > 0], [70, 100])  # the bright white matter of this slice
    annotator.threshold_slider.value = (lo, hi)
    row, column = np.argwhere(plane >= lo)[len(np.argwhere(plane >= lo)) // 2]
    annotator.seed_row.value, annotator.seed_column.value = int(row), int(column)
    annotator.add_region_button.click()
    components = connected((plane >= lo) & (plane <= hi), connectivity=2)
    expected = components == components[row, column]
    np.testing.assert_array_equal(annotator.to_screen(annotator.draft_plane()) == 1, expected)
    # screen (row, column) of an axial radiological view is array (y = Y-1-row, x = X-1-column)
    assert annotator.draft[annotator.index, Y - 1 - row, X - 1 - column] == 1
    assert annotator.draft.sum() == expected.sum() and "added a region" in annotator.status.value

    annotator.remove_region_button.click()
    assert not annotator.draft.any()
    annotator.seed_row.value = 0  # the corner: background, outside the band
    annotator.add_region_button.click()
    assert "outside the threshold range" in annotator.status.value and not annotator.draft.any()


def test_brush_paints_erases_and_undo_edit_restores(session):
    annotator = Annotator(session, axis="coronal")
    annotator.brush_slider.value = 5
    annotator.paint_button.click()
    painted = annotator.draft_plane()
    assert painted.sum() == pytest.approx(np.pi * 25, rel=0.15)  # a disk of radius 5 pixels
    row, column = annotator.seed
    assert painted[Z - 1 - row, X - 1 - column] == 1  # coronal radiological: rows are S->I, columns L<-R
    annotator.seed_column.value += 3
    annotator.erase_button.click()
    assert 0 < annotator.draft_plane().sum() < painted.sum()
    annotator.undo_edit_button.click()
    np.testing.assert_array_equal(annotator.draft_plane(), painted)
    annotator.undo_edit_button.click()
    annotator.undo_edit_button.click()
    assert "no edit of this slice to undo" in annotator.status.value and not annotator.draft.any()


def test_learn_saves_the_slice_then_the_prediction_and_plot_update(session, truth):
    annotator = Annotator(session)
    annotator.next_button.click()
    axis, index = annotator.session_axis, annotator.index
    annotator.set_draft(np.take(truth, index, axis=axis))
    before_plot = annotator.dice_plot.value
    annotator.learn_button.click()
    assert "label version 1" in annotator.status.value
    np.testing.assert_array_equal(np.take(saved(session), index, axis=axis), np.take(truth, index, axis=axis))
    assert session.annotated.sum() == truth.size // truth.shape[axis]  # the whole slice counts as reviewed
    assert [r["op"] for r in annotator.rounds()] == ["correction"]
    assert annotator.dice_plot.value != before_plot
    assert annotator.prediction.model.endswith("/head@v1") and "[corrected]" in annotator.ax.get_title()
    np.testing.assert_array_equal(annotator.draft_plane(), np.take(truth, index, axis=axis))  # reviewed: the saved label

    # the next suggestion: its draft is the refitted model's prediction except where the first slice crosses it
    # (reviewed: the saved label), and Learn's edit Dice compares the prediction shown with the submission
    annotator.next_button.click()
    assert (annotator.session_axis, annotator.index) != (axis, index)
    index2 = tuple(annotator.index if a == annotator.session_axis else slice(None) for a in range(3))
    predicted = annotator._array_plane(annotator.prediction.labels)
    assert predicted.any()
    np.testing.assert_array_equal(annotator.draft_plane(), np.where(session.annotated[index2], session.label[index2], predicted))
    target = np.take(truth, annotator.index, axis=annotator.session_axis)
    annotator.set_draft(target)
    result = annotator.learn()
    assert result.edit_dice == pytest.approx(dice(predicted, target, 2)) and result.edit_dice > 0.6
    assert [r["edit_dice"] is not None for r in annotator.rounds()] == [False, True]


def test_next_suggested_slice_follows_the_session_on_any_axis(session, truth):
    annotator = Annotator(session)
    seen = []
    for _ in range(3):
        hint = session.suggest_next()
        annotator.next_button.click()
        assert (annotator.session_axis, annotator.index) == (hint.axis, hint.index) and hint.reason in annotator.status.value
        assert annotator.plane().shape == tuple(n for a, n in enumerate(SHAPE) if a != hint.axis)
        assert annotator.seed_row.max == annotator.plane().shape[0] - 1
        annotator.set_draft(np.take(truth, hint.index, axis=hint.axis))
        annotator.learn_button.click()
        seen.append(hint.axis)
    for axis, index in ((a["axis"], a["index"]) for a in session.items):
        np.testing.assert_array_equal(np.take(saved(session), index, axis=axis), np.take(truth, index, axis=axis))
    assert len(session.items) == 3


def test_sagittal_edits_land_on_the_right_voxels(session):
    annotator = Annotator(session, axis="sagittal")
    annotator.slice_slider.value = 30
    annotator.seed_row.value, annotator.seed_column.value = 10, 20
    annotator.brush_slider.value = 2
    annotator.paint_button.click()
    annotator.learn_button.click()
    label = saved(session)
    # sagittal: rows S->I (z = Z-1-row), columns A->P (y = Y-1-column), x = the slice
    assert label[Z - 1 - 10, Y - 1 - 20, 30] == 1
    assert label[:, :, 30].sum() == label.sum() == len(disk((10, 20), 2)[0])


def test_undo_round_restores_the_previous_version(session, truth):
    annotator = Annotator(session)
    annotator.set_draft(np.take(truth, annotator.index, axis=0))
    annotator.learn_button.click()
    first = saved(session).copy()
    annotator.next_button.click()
    annotator.set_draft(np.take(truth, annotator.index, axis=annotator.session_axis))
    annotator.learn_button.click()
    assert (saved(session) != first).any()
    annotator.undo_round_button.click()
    np.testing.assert_array_equal(saved(session), first)
    assert [r["op"] for r in annotator.rounds()] == ["correction", "correction", "undo"]
    assert "restores the content before version 2" in annotator.status.value
    assert "undo / redo" in [t.get_text() for t in annotator.dice_figure.axes[0].get_legend().get_texts()]  # marked by a vertical line


def test_a_resumed_session_shows_its_corrections(session, truth):
    annotator = Annotator(session)
    index = annotator.index
    annotator.set_draft(np.take(truth, index, axis=0))
    annotator.learn_button.click()
    resumed = Annotator(AnnotationSession.resume(OMEZarrStore(session.store.url, mode="a"), CASE, label_name=session.label_name))
    assert resumed.index == index and "[corrected]" in resumed.ax.get_title()
    np.testing.assert_array_equal(resumed.draft_plane(), np.take(truth, index, axis=0))
    assert len(resumed.rounds()) == 1


def test_read_only_store_refuses_learn_and_writes_nothing(store_url):
    session = AnnotationSession(OMEZarrStore(store_url, mode="r"), CASE, tiny_model(), "readonly")
    annotator = Annotator(session)
    annotator.paint_button.click()
    annotator.learn_button.click()
    assert "read-only" in annotator.status.value
    assert "readonly" not in OMEZarrStore(store_url).label_names(CASE)


def test_a_case_not_stored_in_ras_is_refused(tmp_path):
    from spadkit.errors import SpadkitError

    store = OMEZarrStore(str(tmp_path / "lps.zarr"), mode="a")
    volume = Volume.from_spacing(np.random.default_rng(0).random((1, 8, 16, 16), dtype=np.float32), (2.0, 2.0, 2.0)).reoriented("LPS")
    store.write_case("lps", volume)
    if store.read_image("lps").orientation == "RAS":
        pytest.skip("this store reorients to RAS on write")
    with pytest.raises(SpadkitError, match="RAS"):
        Annotator(AnnotationSession(store, "lps", tiny_model()))
