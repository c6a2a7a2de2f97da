"""Volume / LabelVolume: geometry from the affine, validation, reorientation, display."""

from __future__ import annotations

import dask.array as da
import nibabel as nib
import numpy as np
import pytest

from spadkit.errors import GeometryMismatchError, InvalidImageError
from spadkit.io import read_volume
from spadkit.volume import (
    LabelVolume,
    Volume,
    affine_from_spacing,
    array_order_affine,
    validate_affine,
)

SOURCE = "/data/case_007/ct.nii.gz"


def _rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def _affine(direction: np.ndarray, spacing_xyz, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing_xyz, dtype=float)  # scale columns
    affine[:3, 3] = origin
    return affine


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    ("direction", "orientation"),
    [
        (np.eye(3), "RAS"),
        (np.diag([-1.0, -1.0, 1.0]), "LPS"),
        (_rotation_z(30.0), "RAS"),  # oblique: x mostly R, y mostly A
        (_rotation_z(120.0), "ALS"),  # x points mostly anterior, y mostly left
        (np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), "AIR"),  # sagittal stack
    ],
    ids=["ras", "lps", "oblique30", "oblique120", "permuted"],
)
def test_geometry_derived_from_affine(direction, orientation):
    spacing_xyz, origin = (0.7, 0.8, 2.5), (-120.5, 33.0, 7.25)
    vol = Volume(np.zeros((6, 5, 4), np.float32), _affine(direction, spacing_xyz, origin))
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert vol.origin == pytest.approx(origin)
    assert vol.orientation == orientation
    np.testing.assert_allclose(vol.direction, direction, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(vol.direction, axis=0), 1.0)


def test_from_spacing_builds_axis_aligned_ras_affine():
    vol = Volume.from_spacing(np.zeros((3, 4, 5)), spacing=(2.5, 0.8, 0.7), origin=(1.0, -2.0, 3.0), modality="CT")
    expected = np.array([[0.7, 0, 0, 1.0], [0, 0.8, 0, -2.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(vol.affine, expected)
    np.testing.assert_array_equal(affine_from_spacing((2.5, 0.8, 0.7), (1.0, -2.0, 3.0)), expected)
    assert (vol.spacing, vol.origin, vol.orientation, vol.modality) == ((2.5, 0.8, 0.7), (1.0, -2.0, 3.0), "RAS", "CT")
    assert vol.affine.dtype == np.float64


def test_default_affine_is_identity():
    vol = Volume(np.zeros((2, 3, 4), np.uint8))
    np.testing.assert_array_equal(vol.affine, np.eye(4))
    assert vol.spacing == (1.0, 1.0, 1.0)


def test_3d_array_gains_channel_axis(rng):
    data = rng.normal(size=(7, 6, 5)).astype(np.float32)
    vol = Volume(data)
    assert vol.shape == (1, 7, 6, 5)
    assert vol.spatial_shape == (7, 6, 5)
    assert vol.num_channels == 1
    assert vol.dtype == np.float32
    np.testing.assert_array_equal(vol.numpy()[0], data)


def test_4d_array_keeps_channels():
    vol = Volume(np.zeros((8, 3, 4, 5), np.int16))
    assert (vol.shape, vol.num_channels, vol.spatial_shape) == ((8, 3, 4, 5), 8, (3, 4, 5))


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ((10,), "1D"),
        ((10, 12), "2D"),
        ((2, 3, 4, 5, 6), "5D"),
        ((9, 3, 4, 5), "9 channels"),
        ((20, 2, 3, 4), "time series"),
    ],
)
def test_bad_array_shapes_rejected_naming_source(shape, words):
    with pytest.raises(InvalidImageError, match=words) as info:
        Volume(np.zeros(shape, np.float32), meta={"source": SOURCE})
    assert info.value.path == SOURCE
    assert str(info.value).startswith(SOURCE)


@pytest.mark.parametrize(
    ("affine", "words"),
    [
        (np.diag([1.0, 0.0, 1.0, 1.0]), "spacing must be positive"),
        (np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "spacing must be positive"),  # degenerate
        (np.where(np.eye(4) == 1, np.nan, 0.0), "NaN or Inf"),
        (np.diag([1.0, 1.0, np.inf, 1.0]), "NaN or Inf"),
        (np.eye(3), "4x4"),
    ],
    ids=["zero-spacing", "degenerate", "nan", "inf", "3x3"],
)
def test_invalid_affine_rejected(affine, words):
    with pytest.raises(InvalidImageError, match=words):
        validate_affine(affine)
    with pytest.raises(InvalidImageError, match=words) as info:
        Volume(np.zeros((2, 3, 4)), affine, meta={"source": SOURCE})
    assert info.value.path == SOURCE


@pytest.mark.parametrize(("shape", "is_2d"), [((1, 1, 64, 48), True), ((3, 1, 8, 8), True), ((1, 2, 64, 48), False)])
def test_is_2d(shape, is_2d):
    assert Volume(np.zeros(shape, np.uint8)).is_2d is is_2d


def test_is_lazy_for_dask_not_numpy(rng):
    data = rng.integers(0, 100, (4, 5, 6)).astype(np.int16)
    lazy = Volume(da.from_array(data, chunks=2))
    assert lazy.is_lazy
    assert not Volume(data).is_lazy
    loaded = lazy.load()
    assert not loaded.is_lazy
    assert isinstance(loaded.array, np.ndarray)
    np.testing.assert_array_equal(loaded.array[0], data)


# --------------------------------------------------------------------------- reorientation


def _nibabel_czyx(image: nib.spatialimages.SpatialImage) -> np.ndarray:
    data = np.asanyarray(image.dataobj)
    return data.transpose(3, 2, 1, 0) if data.ndim == 4 else data.transpose(2, 1, 0)[None]


@pytest.mark.parametrize(("name", "channels"), [("anatomical.nii", 1), ("example4d.nii.gz", 2)])
def test_canonical_matches_nibabel(nibabel_data, name, channels):
    path = nibabel_data / name
    vol = read_volume(path)
    assert vol.orientation == "LAS"
    canonical = vol.canonical()
    expected = nib.as_closest_canonical(nib.load(path))
    assert canonical.orientation == "RAS"
    assert canonical.num_channels == channels
    np.testing.assert_allclose(canonical.affine, expected.affine, atol=1e-6)
    np.testing.assert_array_equal(canonical.numpy(), _nibabel_czyx(expected))
    assert canonical.spacing == pytest.approx(vol.spacing)
    np.testing.assert_array_equal(canonical.meta["original_affine"], vol.affine)
    assert canonical.source == str(path)


@pytest.fixture
def oblique_volume(rng) -> Volume:
    """Anisotropic 2-channel volume on a rotated LAS-ish grid with distinct voxel values."""
    data = rng.permutation(2 * 5 * 6 * 7).reshape(2, 5, 6, 7).astype(np.int32)
    direction = _rotation_z(20.0) @ np.diag([-1.0, 1.0, 1.0])
    return Volume(data, _affine(direction, (0.9, 1.1, 3.0), (40.0, -12.0, 5.5)), meta={"source": SOURCE})


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PSL", "IRA", "SLP"])
def test_reorientation_preserves_world_to_value_mapping(oblique_volume, rng, axcodes):
    out = oblique_volume.reoriented(axcodes)
    assert out.orientation == axcodes
    assert sorted(out.spatial_shape) == sorted(oblique_volume.spatial_shape)
    assert sorted(out.spacing) == pytest.approx(sorted(oblique_volume.spacing))
    src = oblique_volume.numpy()
    dst = out.numpy()
    inverse = np.linalg.inv(out.affine)
    for _ in range(20):
        z, y, x = (int(rng.integers(n)) for n in oblique_volume.spatial_shape)
        world = oblique_volume.affine @ [x, y, z, 1.0]
        nx, ny, nz = np.round(inverse @ world)[:3].astype(int)
        np.testing.assert_allclose(inverse @ world, [nx, ny, nz, 1.0], atol=1e-9)
        np.testing.assert_array_equal(dst[:, nz, ny, nx], src[:, z, y, x])


def test_round_trip_ras_lps_ras_is_identity(mni_t1_path):
    vol = read_volume(mni_t1_path)
    crop = Volume(vol.array[:, 80:84, 100:110, 90:105].compute(), vol.affine)
    lps = crop.reoriented("LPS")
    assert lps.orientation == "LPS"
    assert not np.array_equal(lps.numpy(), crop.numpy())
    back = lps.reoriented("RAS")
    np.testing.assert_array_equal(back.numpy(), crop.numpy())
    np.testing.assert_array_equal(back.affine, crop.affine)
    np.testing.assert_array_equal(back.meta["original_affine"], crop.affine)


def test_reorientation_of_lazy_volume_stays_lazy(oblique_volume):
    lazy = Volume(da.from_array(oblique_volume.numpy(), chunks=(1, 2, 3, 4)), oblique_volume.affine)
    out = lazy.reoriented("LPS")
    assert out.is_lazy
    assert isinstance(out.array, da.Array)
    np.testing.assert_array_equal(out.numpy(), oblique_volume.reoriented("LPS").numpy())


def test_reoriented_to_current_orientation_is_unchanged(oblique_volume):
    same = oblique_volume.reoriented(oblique_volume.orientation)
    np.testing.assert_array_equal(same.numpy(), oblique_volume.numpy())
    np.testing.assert_array_equal(same.affine, oblique_volume.affine)


# --------------------------------------------------------------------------- labels


def test_label_integer_valued_floats_cast_to_int():
    labels = LabelVolume(np.array([[[0.0, 1.0], [2.0, 14.0]]], np.float32))
    assert np.issubdtype(labels.dtype, np.integer)
    np.testing.assert_array_equal(labels.numpy()[0, 0], [[0, 1], [2, 14]])
    assert labels.modality == "label"


def test_label_lazy_integer_valued_floats_cast_to_int():
    data = np.zeros((4, 3, 3), np.float64)
    data[2] = 3.0
    labels = LabelVolume(da.from_array(data, chunks=2))
    assert labels.is_lazy
    assert np.issubdtype(labels.dtype, np.integer)
    np.testing.assert_array_equal(labels.numpy()[0], data.astype(int))


@pytest.mark.parametrize("bad", [0.5, np.nan, np.inf], ids=["fraction", "nan", "inf"])
def test_label_non_integer_floats_rejected(bad):
    data = np.zeros((3, 4, 4), np.float32)
    data[1, 2, 2] = bad
    with pytest.raises(InvalidImageError, match="non-integer") as info:
        LabelVolume(data, meta={"source": SOURCE})
    assert info.value.path == SOURCE


@pytest.mark.parametrize("bad", [0.5, np.nan], ids=["fraction", "nan"])
def test_lazy_float_label_is_checked_in_every_slice(bad):
    # The first slice, not the middle one the check used to read (issue 9, item 10).
    data = np.zeros((7, 4, 4), np.float32)
    data[0, 1, 1] = bad
    with pytest.raises(InvalidImageError, match="non-integer") as info:
        LabelVolume(da.from_array(data, chunks=(2, 4, 4)), meta={"source": SOURCE})
    assert info.value.path == SOURCE


def test_label_bool_becomes_uint8():
    mask = np.zeros((2, 3, 4), bool)
    mask[1, 1, 1:3] = True
    labels = LabelVolume(mask, classes={1: "lesion"})
    assert labels.dtype == np.uint8
    assert labels.numpy().sum() == 2
    assert labels.classes == {1: "lesion"}


def test_label_multi_channel_rejected():
    with pytest.raises(InvalidImageError, match="one channel"):
        LabelVolume(np.zeros((2, 3, 4, 5), np.uint8))


def test_label_non_numeric_rejected():
    with pytest.raises(InvalidImageError, match="not numeric"):
        LabelVolume(np.zeros((2, 3, 4), dtype="U1"))


@pytest.fixture
def image() -> Volume:
    affine = _affine(_rotation_z(10.0), (0.8, 0.8, 2.0), (-50.0, 20.0, 10.0))
    return Volume(np.zeros((1, 4, 5, 6), np.float32), affine, meta={"source": "/data/image.nii.gz"})


def test_check_matches_passes_within_tolerance(image):
    affine = image.affine.copy()
    affine[:3, 3] += 5e-4
    LabelVolume(np.zeros(image.spatial_shape, np.uint8), affine).check_matches(image)


def test_check_matches_shape_mismatch(image):
    label = LabelVolume(np.zeros((4, 5, 7), np.uint8), image.affine, meta={"source": "/data/label.nii.gz"})
    with pytest.raises(GeometryMismatchError, match=r"\(4, 5, 7\).*\(4, 5, 6\)") as info:
        label.check_matches(image)
    assert "/data/label.nii.gz" in str(info.value)
    assert "/data/image.nii.gz" in str(info.value)


@pytest.mark.parametrize("offset_mm", [2e-3, 1.5])
def test_check_matches_affine_mismatch(image, offset_mm):
    affine = image.affine.copy()
    affine[1, 3] += offset_mm
    label = LabelVolume(np.zeros(image.spatial_shape, np.uint8), affine, meta={"source": "/data/label.nii.gz"})
    with pytest.raises(GeometryMismatchError, match="affine differs") as info:
        label.check_matches(image)
    message = str(info.value)
    assert "/data/label.nii.gz" in message
    assert "/data/image.nii.gz" in message
    assert f"{offset_mm:.4g} mm" in message


# --------------------------------------------------------------------------- display


def test_repr_html_in_memory_has_summary_and_thumbnail(rng):
    vol = Volume.from_spacing(rng.normal(size=(3, 20, 30)).astype(np.float32), spacing=(2.5, 0.8, 0.7))
    page = vol._repr_html_()
    assert "(1, 3, 20, 30)" in page
    assert "(2.5, 0.8, 0.7)" in page
    assert "<img src='data:image/png;base64," in page


def test_repr_html_lazy_has_no_thumbnail():
    vol = Volume(da.zeros((3, 20, 30), chunks=10))
    page = vol._repr_html_()
    assert "(1, 3, 20, 30)" in page
    assert "<img" not in page
    assert "(lazy)" in page


def test_repr_is_one_line():
    vol = Volume.from_spacing(np.zeros((3, 4, 5), np.int16), spacing=(2.5, 0.8, 0.7), meta={"source": SOURCE})
    text = repr(vol)
    assert "\n" not in text
    assert text.startswith("Volume(shape=(1, 3, 4, 5), spacing=(2.5, 0.8, 0.7)")
    assert SOURCE in text


def test_array_order_affine_maps_array_indices_to_the_same_world_point(oblique_volume):
    """``array_order_affine(A) @ (z, y, x, 1) == A @ (x, y, z, 1)``, and converting twice gives ``A`` back."""
    affine = oblique_volume.affine
    converted = array_order_affine(affine)
    for z, y, x in [(0, 0, 0), (1, 2, 3), (4, 0, 7)]:
        np.testing.assert_allclose(converted @ [z, y, x, 1], affine @ [x, y, z, 1])
    np.testing.assert_array_equal(array_order_affine(converted), affine)
    sz, sy, sx = oblique_volume.spacing
    np.testing.assert_allclose(np.linalg.norm(converted[:3, :3], axis=0), (sz, sy, sx))  # MONAI's pixdim
