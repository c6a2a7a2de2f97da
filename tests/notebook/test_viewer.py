"""SliceViewer driven as a user would: move sliders, toggle the view, click buttons, read what is drawn."""

from __future__ import annotations

import io

import dask.array as da
import numpy as np
import pytest
from PIL import Image

from spadkit.demo import mni152_tissue_labels, nilearn_file, thick_slices
from spadkit.errors import GeometryMismatchError, SpadkitError
from spadkit.io import read_volume
from spadkit.notebook import SliceViewer
from spadkit.notebook.viewer import LABEL_COLORS
from spadkit.volume import LabelVolume, Volume

SHAPE = (6, 8, 10)  # (Z, Y, X)


def marked_volume(spacing=(3.0, 1.0, 1.0)) -> Volume:
    """RAS volume of ramps with one bright voxel at the patient's right, anterior, superior corner."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    data = (100 * z + 10 * y + x).astype(np.float32)
    data[-1, -1, -1] = 5000.0  # voxel (x, y, z) max: most Right, Anterior, Superior
    return Volume.from_spacing(data, spacing)


def png_pixels(viewer: SliceViewer) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(viewer.image_widget.value)))


def test_axial_view_is_radiological_and_neurological_flips_left_right():
    viewer = SliceViewer(marked_volume())
    viewer.slice_slider.value = SHAPE[0] - 1  # the superior slice holds the marker
    plane = viewer.plane()
    assert plane.shape == (SHAPE[1], SHAPE[2])
    assert plane[0, 0] == 5000.0  # anterior at the top, patient right on the screen's left
    assert viewer.edge_letters == ("R", "L", "A", "P")
    np.testing.assert_array_equal(viewer.image.get_array(), plane)

    neuro = SliceViewer(marked_volume(), convention="neurological")
    neuro.slice_slider.value = SHAPE[0] - 1
    assert neuro.plane()[0, -1] == 5000.0 and neuro.edge_letters == ("L", "R", "A", "P")


@pytest.mark.parametrize(
    "axis, convention, letters, marker",
    [
        ("coronal", "radiological", ("R", "L", "S", "I"), (0, 0)),
        ("coronal", "neurological", ("L", "R", "S", "I"), (0, -1)),
        ("sagittal", "radiological", ("A", "P", "S", "I"), (0, 0)),
        ("sagittal", "neurological", ("A", "P", "S", "I"), (0, 0)),  # anterior stays on the left
    ],
)
def test_coronal_and_sagittal_have_superior_up(axis, convention, letters, marker):
    viewer = SliceViewer(marked_volume(), axis=axis, convention=convention)
    viewer.slice_slider.value = viewer.slice_slider.max  # most anterior / most right slice
    assert viewer.plane()[marker] == 5000.0 and viewer.edge_letters == letters


def test_storage_orientation_does_not_change_the_picture():
    ras = SliceViewer(marked_volume())
    lps = SliceViewer(marked_volume().reoriented("LPS"))
    for axis in ("axial", "coronal", "sagittal"):
        for viewer in (ras, lps):
            viewer.axis_buttons.value = axis
            viewer.slice_slider.value = 2
        np.testing.assert_array_equal(ras.plane(), lps.plane())
        assert ras.slice_position_mm == pytest.approx(lps.slice_position_mm)


def test_slider_shows_that_slice_and_redraws_the_png():
    volume = marked_volume()
    viewer = SliceViewer(volume)
    assert viewer.index == SHAPE[0] // 2  # opens on the middle slice
    before = viewer.image_widget.value
    viewer.slice_slider.value = 1
    expected = volume.numpy()[0, 1, ::-1, ::-1]
    np.testing.assert_array_equal(viewer.image.get_array(), expected)
    assert viewer.image_widget.value != before
    assert viewer.ax.get_title().startswith(f"axial 1/{SHAPE[0] - 1}  S = 3.0 mm")


def test_axis_toggle_sets_the_slider_range_and_the_physical_aspect():
    thick = thick_slices(read_volume(nilearn_file("t1")).load())  # 1 x 1 x 3 mm
    viewer = SliceViewer(thick)
    assert viewer.aspect == pytest.approx(1.0)
    viewer.axis_buttons.value = "coronal"
    z, y, x = thick.spatial_shape
    assert (viewer.slice_slider.max, viewer.index) == (y - 1, y // 2)
    assert viewer.plane().shape == (z, x)
    assert viewer.aspect == pytest.approx(3.0) and viewer.ax.get_aspect() == pytest.approx(3.0)
    height, width = png_pixels(viewer).shape[:2]
    assert height / width == pytest.approx(3 * z / x, rel=0.15)  # a brain, not a pancake
    viewer.axis_buttons.value = "sagittal"
    assert (viewer.slice_slider.max, viewer.plane().shape) == (x - 1, (z, y))


def test_window_level_and_auto_button():
    viewer = SliceViewer(marked_volume())
    auto = viewer.display_range
    viewer.level_slider.value = 300.0
    viewer.window_slider.value = 200.0
    assert viewer.image.get_clim() == pytest.approx((200.0, 400.0))
    viewer.auto_button.click()
    assert viewer.image.get_clim() == pytest.approx(auto)
    middle = np.concatenate([p.ravel() for p in (viewer.volume.numpy()[0, 3], viewer.volume.numpy()[0, :, 4], viewer.volume.numpy()[0, :, :, 5])])
    assert auto == pytest.approx(tuple(np.percentile(middle, [1, 99])))


def test_label_overlay_colours_and_opacity():
    volume = marked_volume()
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[3, :4, :5] = 1  # posterior-left quarter of the middle slice (patient left, posterior)
    labels[3, 4:, 5:] = 2
    viewer = SliceViewer(volume, LabelVolume(labels, volume.affine, classes={1: "liver", 2: "spleen"}))
    viewer.opacity_slider.value = 0.7
    rgba = viewer.overlay.get_array()
    # radiological: patient left (low x) on the right, posterior (low y) at the bottom
    assert rgba[-1, -1, 3] == pytest.approx(0.7) and rgba[0, 0, 3] == pytest.approx(0.7)
    np.testing.assert_allclose(rgba[-1, -1, :3], LABEL_COLORS[0])
    np.testing.assert_allclose(rgba[0, 0, :3], LABEL_COLORS[1])
    assert rgba[0, -1, 3] == 0.0  # background stays transparent
    assert [t.get_text() for t in viewer.ax.get_legend().get_texts()] == ["1 liver", "2 spleen"]
    viewer.opacity_slider.value = 0.0
    assert viewer.overlay.get_array()[..., 3].max() == 0.0


def test_tissue_overlay_on_mni152_marks_gray_and_white_matter():
    image, labels = read_volume(nilearn_file("t1")), mni152_tissue_labels()
    viewer = SliceViewer(image, labels, axis="coronal")
    shown = viewer.plane("label")
    assert set(np.unique(shown)) == {0, 1, 2}
    assert np.median(viewer.plane()[shown == 2]) > np.median(viewer.plane()[shown == 1])  # WM brighter than GM in T1


def test_without_label_the_opacity_control_is_disabled():
    viewer = SliceViewer(marked_volume())
    assert viewer.opacity_slider.disabled and viewer.overlay is None
    with pytest.raises(SpadkitError, match="no label map"):
        viewer.plane("label")


def test_small_lazy_volumes_are_loaded_once_large_ones_stay_lazy():
    volume = Volume.from_spacing(da.from_array(marked_volume().numpy(), chunks=(1, 2, 8, 10)), (3.0, 1.0, 1.0))
    assert not SliceViewer(volume).volume.is_lazy  # 1.9 KB: read once, browsing is fast
    lazy = SliceViewer(volume, max_memory_mb=0.001)  # 1 KiB budget
    assert lazy.volume.is_lazy
    lazy.slice_slider.value = 2
    np.testing.assert_array_equal(lazy.plane(), volume.numpy()[0, 2, ::-1, ::-1])


def test_channels_have_a_slider():
    data = np.stack([marked_volume().numpy()[0], -marked_volume().numpy()[0]])
    volume = Volume.from_spacing(da.from_array(data, chunks=(1, 2, 8, 10)), (3.0, 1.0, 1.0))
    viewer = SliceViewer(volume)
    first = viewer.display_range
    viewer.channel_slider.value = 1
    assert viewer.display_range == pytest.approx((-first[1], -first[0]))  # its own auto window
    np.testing.assert_array_equal(viewer.plane(), -data[0, SHAPE[0] // 2, ::-1, ::-1])


def test_2d_image_offers_only_the_axial_view(pydicom_data):
    ct = read_volume(pydicom_data / "CT_small.dcm")
    viewer = SliceViewer(ct)
    assert viewer.axis_buttons.options == ("axial",) and viewer.slice_slider.max == 0
    assert viewer.pixel_spacing == pytest.approx(ct.spacing[1:])
    with pytest.raises(SpadkitError, match="unavailable view 'coronal'"):
        SliceViewer(ct, axis="coronal")


def test_bad_arguments_are_refused():
    volume = marked_volume()
    with pytest.raises(GeometryMismatchError):
        SliceViewer(volume, LabelVolume(np.zeros((6, 8, 9), dtype=np.uint8)))
    with pytest.raises(SpadkitError, match="spadkit Volume"):
        SliceViewer(np.zeros(SHAPE))
    with pytest.raises(SpadkitError, match="convention"):
        SliceViewer(volume, convention="left-handed")
    with pytest.raises(SpadkitError, match="opacity"):
        SliceViewer(volume, opacity=1.5)


def test_displays_as_a_widget():
    bundle = SliceViewer(marked_volume())._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
