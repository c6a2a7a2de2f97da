"""Sample data: nilearn's MNI152 T1 and its gray-matter label, opened from napari's File > Open Sample."""

from __future__ import annotations

import numpy as np
import pytest

from spadkit.demo import nilearn_file
from spadkit.io import read_volume
from tests.napari.conftest import save_screenshot

pytestmark = pytest.mark.gui


def test_mni152_sample_opens_with_its_gray_matter_label(make_napari_viewer, artifacts):
    viewer = make_napari_viewer(show=True)
    image, gm = viewer.open_sample("spadkit", "mni152")
    assert (image.name, gm.name, gm.visible) == ("MNI152 T1", "gray matter", True)
    assert image.data.shape == gm.data.shape == (189, 233, 197)  # (Z, Y, X) voxels of 1 mm
    np.testing.assert_allclose(image.scale, (-1.0, -1.0, -1.0))
    np.testing.assert_array_equal(gm.scale, image.scale)
    np.testing.assert_array_equal(gm.translate, image.translate)
    assert set(np.unique(gm.data)) == {0, 1} and 0.05 < gm.data.mean() < 0.2  # gray matter: ~9% of the box
    assert list(gm.features["class"]) == ["background", "gray matter"]
    # the label sits on the image: T1 gray matter is darker than white matter and brighter than the CSF/air around
    wm = read_volume(nilearn_file("wm")).canonical().numpy()[0]
    gray, white = image.data[gm.data == 1].mean(), image.data[wm > wm.max() / 2].mean()
    outside = image.data[(gm.data == 0) & (wm < wm.max() / 10)].mean()
    assert outside < 0.8 * gray < 0.8 * white, (outside, gray, white)
    gm.opacity = 0.4
    viewer.dims.set_point(0, image.data_to_world((100, 0, 0))[0])
    viewer.reset_view()
    save_screenshot(viewer, artifacts, "mni152_axial_window", canvas_only=False)
    viewer.dims.order = (1, 0, 2)
    viewer.reset_view()
    save_screenshot(viewer, artifacts, "mni152_coronal")
