"""The spadkit writer: labels layers saved as new label versions in the store, or as NIfTI."""

from __future__ import annotations

import nibabel
import numpy as np
import pytest
from napari.layers import Labels
from qtpy.QtCore import QPoint, Qt
from spadkit_napari._reader import napari_get_reader
from spadkit_napari._writer import LabelWriteError

from spadkit.errors import GeometryMismatchError, StoreError
from spadkit.io import OMEZarrStore, write_nifti
from tests.napari.conftest import MARKER, SHAPE, save_screenshot


def open_case(store_path):
    """The case's image and label layers, built from the reader's layer tuples without a viewer."""
    image, seg = napari_get_reader(str(store_path / "brain"))(str(store_path / "brain"))
    return image, Labels(seg[0], **seg[1])


def test_an_edited_label_layer_is_saved_as_a_new_version_and_the_old_one_stays(store_path):
    _, seg = open_case(store_path)
    seg.data[2, 10:20, 10:20] = 2
    [written] = seg.save(str(store_path), plugin="spadkit")
    store = OMEZarrStore(str(store_path))
    assert written == f"{store_path}/brain/labels/seg/v0002"
    assert [v["version"] for v in store.label_versions("brain")] == [1, 2]
    assert "napari layer 'seg v1'" in store.label_versions("brain")[-1]["message"]
    np.testing.assert_array_equal(store.read_label("brain").numpy()[0], seg.data)
    assert (store.read_label("brain", version=1).numpy()[0, 2, 10:20, 10:20] == 0).all()
    assert store.read_label("brain").classes == {0: "background", 1: "marker", 2: "block"}


def test_a_new_layer_on_the_image_grid_finds_its_case_and_is_named_after_the_layer(store_path):
    (_, image_kwargs, _), _ = open_case(store_path)
    transform = {key: image_kwargs[key] for key in ("scale", "translate", "rotate")}
    tumour = Labels(np.zeros(SHAPE, np.uint8), name="tumour (draft)", **transform)  # as 'New labels layer' makes it
    tumour.data[5, 40:44, 30:34] = 1
    [written] = tumour.save(str(store_path), plugin="spadkit")
    assert written.endswith("/brain/labels/tumour_draft/v0001")
    np.testing.assert_array_equal(OMEZarrStore(str(store_path)).read_label("brain", "tumour_draft").numpy()[0], tumour.data)


def test_a_label_layer_at_another_scale_is_refused_and_nothing_is_written(store_path):
    _, seg = open_case(store_path)
    seg.scale = (-1.0, -1.0, -1.0)  # 1 mm slices drawn over the 3 mm image
    with pytest.raises(LabelWriteError, match=r"(?s)'seg v1' is not on the grid of case brain.*spacing \[1\. 1\. 1\.\].*\[3\. 1\. 1\.\].*New labels layer") as err:
        seg.save(str(store_path), plugin="spadkit")
    assert isinstance(err.value.__cause__, GeometryMismatchError)
    fresh = Labels(np.zeros(SHAPE, np.uint8), scale=(2.0, 1.0, 1.0), name="fresh")
    with pytest.raises(LabelWriteError, match=r"'fresh' \(shape \(Z, Y, X\) \(20, 96, 80\), spacing 2 x 1 x 1 mm\) lies on no case"):
        fresh.save(str(store_path), plugin="spadkit")
    store = OMEZarrStore(str(store_path))
    assert store.label_names("brain") == ["seg"] and len(store.label_versions("brain")) == 1


def test_saving_into_a_folder_that_is_no_store_creates_nothing(tmp_path, store_path):
    _, seg = open_case(store_path)
    with pytest.raises(LabelWriteError, match="new.zarr: no OME-Zarr store here") as err:
        seg.save(str(tmp_path / "new.zarr"), plugin="spadkit")
    assert isinstance(err.value.__cause__, StoreError)
    assert not (tmp_path / "new.zarr").exists()


def test_a_nifti_label_keeps_the_source_files_grid_and_orientation(tmp_path, marked_case):
    source = write_nifti(marked_case[0].reoriented("LPS"), tmp_path / "t1_lps.nii.gz")
    [(data, kwargs, _)] = napari_get_reader(str(source))(str(source))
    assert kwargs["metadata"]["spadkit"]["orientation"] == "LPS"
    np.testing.assert_allclose(kwargs["scale"], (-3.0, -1.0, -1.0))  # shown in RAS after all
    label = Labels(np.zeros(data.shape, np.uint8), **{k: kwargs[k] for k in ("scale", "translate", "rotate", "metadata")})
    label.data[MARKER] = 1
    [written] = label.save(str(tmp_path / "marker.nii.gz"), plugin="spadkit")
    saved, original = nibabel.load(written), nibabel.load(source)
    np.testing.assert_allclose(saved.affine, original.affine, atol=1e-6)
    assert saved.shape == original.shape
    # the marker (bright in the image) is where the label says, voxel for voxel in the source's own order
    np.testing.assert_array_equal(np.asarray(saved.dataobj) == 1, np.asarray(original.dataobj) == 1000)


@pytest.mark.gui
def test_a_stroke_painted_on_the_radiological_view_lands_on_the_voxels_under_it(make_napari_viewer, qtbot, store_path, artifacts):
    viewer = make_napari_viewer(show=True)
    image, seg = viewer.open(str(store_path / "brain"), plugin="spadkit")
    seg.visible = False
    z = (MARKER[0].start + MARKER[0].stop) // 2
    viewer.dims.set_point(0, image.data_to_world((z, 0, 0))[0])
    viewer.reset_view()
    shot = save_screenshot(viewer, artifacts, "paint_before")[..., :3].mean(axis=2)
    canvas = viewer.window._qt_viewer.canvas.native
    assert shot.shape == (canvas.height(), canvas.width())
    row, col = np.argwhere(shot > 200).mean(axis=0)  # the bright marker on screen
    seg.visible = True
    viewer.layers.selection.active = seg
    seg.mode, seg.selected_label, seg.brush_size = "paint", 7, 3
    qtbot.mouseClick(canvas, Qt.MouseButton.LeftButton, pos=QPoint(int(col), int(row)))
    qtbot.waitUntil(lambda: (seg.data == 7).any(), timeout=3000)
    save_screenshot(viewer, artifacts, "paint_after")
    painted = np.argwhere(seg.data == 7)
    assert (painted[:, 0] == z).all()  # on the slice shown
    assert ((painted[:, 1] >= MARKER[1].start) & (painted[:, 1] < MARKER[1].stop)).all()
    assert ((painted[:, 2] >= MARKER[2].start) & (painted[:, 2] < MARKER[2].stop)).all()
    viewer.layers.save(str(store_path), selected=True, plugin="spadkit")
    stored = OMEZarrStore(str(store_path)).read_label("brain").numpy()[0]
    np.testing.assert_array_equal(np.argwhere(stored == 7), painted)
