"""A spadkit store opens in a real napari viewer (napari-ome-zarr) at its physical scale."""

from __future__ import annotations

import numpy as np
import pytest

from spadkit.demo import mni152_tissue_labels, thick_slices
from spadkit.io import OMEZarrStore, read_volume
from spadkit.volume import LabelVolume, Volume

pytestmark = pytest.mark.gui


def test_store_case_opens_in_napari_at_physical_scale(make_napari_viewer, tmp_path, mni_t1_path):
    t1 = read_volume(mni_t1_path).load()
    thick = thick_slices(Volume(t1.numpy().astype(np.int16), t1.affine))  # 1x1x3 mm, 63 slices
    labels = mni152_tissue_labels()
    thick_labels = LabelVolume(labels.numpy()[:, 1::3][:, : thick.spatial_shape[0]], thick.affine, classes=labels.classes)
    store = OMEZarrStore(str(tmp_path / "s.zarr"), mode="a")
    store.write_case("brain", thick, thick_labels)

    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path / "s.zarr" / "brain"), plugin="napari-ome-zarr")
    image = next(layer for layer in layers if layer._type_string == "image")
    label = next(layer for layer in layers if layer._type_string == "labels")
    np.testing.assert_allclose(image.scale, (3.0, 1.0, 1.0))  # mm per voxel (z, y, x)
    np.testing.assert_allclose(label.scale[-3:], (3.0, 1.0, 1.0))
    assert image.multiscale and image.data[0].shape == thick.spatial_shape
    assert np.asarray(label.data[0]).max() == 2
    # the world extent is physical: 63 slices x 3 mm ~ 189 mm, like the 1 mm template's 189 slices
    assert image.extent.world[1][0] - image.extent.world[0][0] == pytest.approx(63 * 3.0, abs=3.0)



def _marker_on_screen(viewer, layer, z: int, high: float) -> tuple[float, float]:
    """Offset (rows, columns; pixels) of the bright marker from the brain's centre on axial slice ``z``."""
    layer.contrast_limits = (0, high)
    viewer.dims.set_point(0, layer.data_to_world((z, 0, 0))[0])
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].mean(axis=2)
    rows, cols = np.argwhere(shot > 250).mean(axis=0) - np.argwhere(shot > 5).mean(axis=0)
    return float(rows), float(cols)


def test_spadkit_reader_shows_the_case_radiologically_where_napari_ome_zarr_turns_it(make_napari_viewer, tmp_path, mni_t1_path):
    """PITFALLS 21: napari-ome-zarr draws a RAS axial slice 180 degrees from radiological and drops the origin."""
    t1 = read_volume(mni_t1_path).load()
    data = t1.numpy().astype(np.int16)
    high = 4 * int(data.max())
    data[:, 95:105, 170:190, 120:140] = high  # a marker anterior (high y) and on the patient's right (high x)
    image = Volume(data, t1.affine)
    OMEZarrStore(str(tmp_path / "s.zarr"), mode="a").write_case("brain", image)
    case = str(tmp_path / "s.zarr" / "brain")
    viewer = make_napari_viewer(show=True)
    [ome] = [layer for layer in viewer.open(case, plugin="napari-ome-zarr") if layer._type_string == "image"]
    turned = _marker_on_screen(viewer, ome, 100, high)
    np.testing.assert_allclose(ome.data_to_world((0, 0, 0)), 0)  # the origin is lost
    viewer.layers.clear()  # reset_view fits every layer, hidden ones too
    ours = viewer.open(case, plugin="spadkit")[0]
    radiological = _marker_on_screen(viewer, ours, 100, high)

    assert ours.data[0].shape == ome.data[0].shape[-3:] == image.spatial_shape
    np.testing.assert_allclose(ours.data_to_world((0, 0, 0)), -np.asarray(image.origin[::-1]))  # (I, P, L) mm
    np.testing.assert_allclose(np.abs(ours.scale), np.abs(ome.scale[-3:]))
    assert turned[0] > 20 and turned[1] > 20, turned  # anterior at the bottom, right on the right
    assert radiological[0] < -20 and radiological[1] < -20, radiological  # anterior up, right on the left
