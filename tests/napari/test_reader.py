"""The spadkit reader: which paths it claims, and the layers a store case becomes in a real viewer."""

from __future__ import annotations

import shutil

import dask.array as da
import nrrd
import numpy as np
import pytest
import zarr
from napari.components import ViewerModel
from spadkit_napari._geometry import affine_of_layer, layer_transform
from spadkit_napari._reader import napari_get_reader

from spadkit.errors import StoreError
from spadkit.ingest import intensity_stats
from spadkit.io import OMEZarrStore, write_nifti
from spadkit.volume import Volume
from tests.napari.conftest import MARKER, ORIGIN_XYZ, SHAPE, VIEWS, marker_offset, save_screenshot


def test_claims_spadkit_stores_and_medical_files_and_leaves_the_rest(tmp_path, store_path, pydicom_data, marked_case):
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w", zarr_format=3).attrs["multiscales"] = []
    series = tmp_path / "series"
    series.mkdir()
    shutil.copy(pydicom_data / "CT_small.dcm", series / "slice001")  # DICOM files often have no suffix
    (tmp_path / "notes").mkdir()
    nifti = write_nifti(marked_case[0], tmp_path / "t1.nii.gz")

    for claimed in (store_path / "brain", store_path, series, nifti, str(store_path / "brain") + "/"):
        assert callable(napari_get_reader(str(claimed))), claimed
    for left in (other, tmp_path / "notes", tmp_path / "picture.png", store_path / "brain" / "labels"):
        assert napari_get_reader(str(left)) is None, left
    assert napari_get_reader([str(nifti), str(nifti)]) is None  # stacks are not spadkit's


def test_a_case_becomes_a_lazy_multiscale_image_and_visible_labels_placed_in_mm(store_path):
    store = OMEZarrStore(str(store_path))
    image, seg = napari_get_reader(str(store_path / "brain"))(str(store_path / "brain"))
    data, kwargs, kind = image
    assert kind == "image" and kwargs["name"] == "brain" and kwargs["multiscale"]
    assert [level.shape for level in data] == [(20, 96, 80), (20, 48, 40)]
    assert all(isinstance(level, da.Array) for level in data)  # drawn chunk by chunk, nothing read yet
    np.testing.assert_allclose(kwargs["scale"], (-3.0, -1.0, -1.0))  # mm, axes reversed: radiological
    np.testing.assert_allclose(kwargs["translate"], (-ORIGIN_XYZ[2], -ORIGIN_XYZ[1], -ORIGIN_XYZ[0]))
    np.testing.assert_allclose(affine_of_layer({**kwargs, "shear": None, "affine": None}), store.read_image("brain").affine)
    low, high = kwargs["contrast_limits"]
    assert 150 <= low < high <= 1000  # from the store's intensity statistics, no voxel read

    labels, label_kwargs, kind = seg
    assert kind == "labels" and label_kwargs["name"] == "seg v1"
    assert label_kwargs["metadata"]["spadkit"] == {"store": str(store_path), "case": "brain", "label": "seg", "version": 1}
    assert label_kwargs["features"]["class"] == ["background", "marker", "block"]
    assert isinstance(labels, np.ndarray) and (labels[MARKER] == 1).all()  # in memory: editable, not the stored version


def test_a_store_opens_its_only_case_and_names_them_when_there_are_several(store_path, marked_case):
    layers = napari_get_reader(str(store_path))(str(store_path))
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["brain", "seg v1"]
    OMEZarrStore(str(store_path), mode="a").write_case("knee", *marked_case)
    with pytest.raises(StoreError, match=r"2 cases.*\n.*marked.zarr/brain.*brain, knee"):
        napari_get_reader(str(store_path))(str(store_path))


@pytest.mark.gui
@pytest.mark.parametrize("view", VIEWS)
def test_views_are_radiological(make_napari_viewer, store_path, artifacts, view):
    viewer = make_napari_viewer(show=True)
    image, seg = viewer.open(str(store_path / "brain"), plugin="spadkit")
    assert (image.name, seg.name, seg.visible) == ("brain", "seg v1", True)
    seg.visible = False
    rows, cols = marker_offset(viewer, image, view, artifacts, "spadkit")
    # the marker is superior, anterior and on the patient's right. Axial: anterior up, right on the
    # screen's left; coronal: superior up, right on the left; sagittal: superior up, anterior on the left.
    assert rows < -10 and cols < -10, (rows, cols)


def test_nrrd_and_dicom_files_open_in_ras_at_their_spacing(tmp_path, pydicom_data, marked_case):
    data = np.asarray(marked_case[0].numpy()[0].transpose(2, 1, 0))  # (x, y, z) for NRRD
    header = {"space": "left-posterior-superior", "space directions": np.diag([1.0, 1.0, 3.0]), "space origin": np.array([10.0, 20.0, -5.0])}
    nrrd.write(str(tmp_path / "t1.nrrd"), data, header)
    [(array, kwargs, kind)] = napari_get_reader(str(tmp_path / "t1.nrrd"))(str(tmp_path / "t1.nrrd"))
    assert kind == "image" and kwargs["metadata"]["spadkit"]["orientation"] == "LPS"
    np.testing.assert_allclose(kwargs["scale"], (-3.0, -1.0, -1.0))
    # x and y flipped to RAS: the LPS file's first voxel is the RAS array's last in x and y
    assert array[0, -1, -1] == data[0, 0, 0] and array.shape == marked_case[0].spatial_shape
    np.testing.assert_allclose(kwargs["translate"][0], 5.0)  # world axis 0 is inferior: -(z of slice 0)

    [(ct, kwargs, _)] = napari_get_reader(str(pydicom_data / "CT_small.dcm"))(str(pydicom_data / "CT_small.dcm"))
    assert ct.shape == (1, 128, 128)
    np.testing.assert_allclose(kwargs["scale"][1:], (-0.661468, -0.661468), rtol=1e-5)  # PixelSpacing, mm


def test_channels_become_one_multiscale_layer_each_with_their_own_contrast(tmp_path, marked_case):
    image, _ = marked_case
    two = Volume(np.concatenate([image.numpy(), 2 * image.numpy()]), image.affine)
    store = OMEZarrStore(str(tmp_path / "two.zarr"), mode="a")
    store.write_case("pair", two, attrs={"intensity": intensity_stats(two)})
    viewer = ViewerModel()
    layers = viewer.open(str(tmp_path / "two.zarr" / "pair"), plugin="spadkit")
    assert len(layers) == 2 and all(layer.multiscale for layer in layers)
    assert [layer.data[0].shape for layer in layers] == [SHAPE, SHAPE]
    low, high = (np.asarray(layer.contrast_limits) for layer in layers)
    np.testing.assert_allclose(high, 2 * low)  # each channel its own percentiles
    np.testing.assert_array_equal(np.asarray(layers[1].data[0][5]), 2 * np.asarray(layers[0].data[0][5]))
    np.testing.assert_allclose(np.asarray(layers[1].data[1][5]), 2 * np.asarray(layers[0].data[1][5]), atol=1)  # rounded block means


@pytest.mark.gui
def test_the_3d_view_starts_from_the_patients_feet_unmirrored(make_napari_viewer, artifacts):
    data = np.zeros((60, 60, 60), np.float32)
    data[5:15, 25:35, 5:15] = 1.0  # inferior, on the patient's left
    data[45:55, 25:35, 45:55] = 1.0  # superior, on the patient's right
    data[28:32, 52:58, 28:32] = 1.0  # anterior
    viewer = make_napari_viewer(show=True)
    viewer.add_image(data, rendering="mip", **layer_transform(Volume.from_spacing(data, (1, 1, 1)).affine))
    viewer.dims.ndisplay = 3
    getattr(viewer, "scene", viewer).camera.perspective = 60  # nearer cubes look larger (napari < 0.9: viewer.camera)
    viewer.reset_view()
    shot = save_screenshot(viewer, artifacts, "cubes_3d")[..., :3].mean(axis=2) > 100
    half = shot.shape[1] // 2
    on_left, on_right = shot[:, :half].sum(), shot[:, half:].sum()
    # the superior-right cube is on the screen's left and far, the inferior-left one on the right and near,
    # the anterior one above the centre: seen from the feet, anterior up, as a person standing there sees it
    assert on_right > 2 * on_left, (on_left, on_right)
    anterior_row = np.argwhere(shot[:, half - 40 : half + 40]).mean(axis=0)[0]
    assert anterior_row < shot.shape[0] / 2 - 20, anterior_row
