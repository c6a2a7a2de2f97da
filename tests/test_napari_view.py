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
