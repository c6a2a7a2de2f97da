"""Readers: NIfTI, DICOM, NRRD, 2D images and the read_volume dispatcher on real files."""

from __future__ import annotations

import copy
import shutil
import struct
from pathlib import Path

import dask.array as da
import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.uid import generate_uid

from spadkit.errors import CorruptFileError, InvalidImageError, UnsupportedFormatError
from spadkit.io import SUPPORTED_SUFFIXES, detect_format, read_label, read_volume, write_nifti
from spadkit.volume import Volume
from tests._dicom import radiograph_dataset
from tests.conftest import write_nifti_array


def _truncate(src: Path, dst: Path, keep: int | float) -> Path:
    """Copy the first ``keep`` bytes (or that fraction) of ``src`` to ``dst``."""
    data = src.read_bytes()
    dst.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    return dst


# --------------------------------------------------------------------------- NIfTI


def test_mni_t1_read_lazily_with_real_geometry(mni_t1_path):
    vol = read_volume(mni_t1_path)
    assert vol.is_lazy
    assert isinstance(vol.array, da.Array)
    assert vol.shape == (1, 189, 233, 197)
    assert vol.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert vol.orientation == "RAS"
    assert vol.source == str(mni_t1_path)
    expected = nib.load(mni_t1_path)
    np.testing.assert_array_equal(vol.affine, expected.affine)
    np.testing.assert_array_equal(vol.numpy()[0], expected.get_fdata().transpose(2, 1, 0))


def test_read_label_on_mni_grid(mni_gm_path, mni_t1_path):
    labels = read_label(mni_gm_path, classes={0: "background"})
    assert labels.is_lazy
    assert labels.shape == (1, 189, 233, 197)
    assert labels.dtype == np.uint8
    assert labels.classes == {0: "background"}
    labels.check_matches(read_volume(mni_t1_path))


def test_read_label_float_file_with_fractions_rejected(tmp_path, rng):
    path = write_nifti_array(tmp_path / "prob.nii.gz", rng.random((6, 5, 4)).astype(np.float32))
    with pytest.raises(InvalidImageError, match="non-integer") as info:
        read_label(path)
    assert info.value.path == str(path)


def test_nifti_4d_with_two_volumes_gives_two_channels(nibabel_data):
    path = nibabel_data / "example4d.nii.gz"
    vol = read_volume(path)
    assert vol.shape == (2, 24, 96, 128)
    assert vol.spacing == pytest.approx((2.2, 2.0, 2.0), abs=1e-5)
    np.testing.assert_array_equal(vol.numpy(), np.asanyarray(nib.load(path).dataobj).transpose(3, 2, 1, 0))


def test_nifti_big_endian_gives_native_dtype(nibabel_data):
    path = nibabel_data / "anatomical.nii"
    assert nib.load(path).get_data_dtype().str == ">i2"
    vol = read_volume(path)
    assert vol.dtype == np.dtype("int16")
    assert vol.dtype.isnative
    data = vol.numpy()
    assert data.dtype.isnative
    np.testing.assert_array_equal(data[0], np.asanyarray(nib.load(path).dataobj).transpose(2, 1, 0))
    assert data.max() > 0


def test_nifti_2d_gives_single_slice(tmp_path, rng):
    data = rng.integers(0, 255, (40, 30)).astype(np.uint8)  # (x, y)
    vol = read_volume(write_nifti_array(tmp_path / "slice.nii", data, np.diag([0.5, 0.25, 3.0, 1.0])))
    assert vol.shape == (1, 1, 30, 40)
    assert vol.is_2d
    assert vol.spacing == pytest.approx((3.0, 0.25, 0.5))
    np.testing.assert_array_equal(vol.numpy()[0, 0], data.T)


def test_nifti_5d_vector_image_gives_channels(tmp_path, rng):
    data = rng.normal(size=(6, 5, 4, 1, 3)).astype(np.float32)  # (x, y, z, t=1, c)
    vol = read_volume(write_nifti_array(tmp_path / "vector.nii.gz", data))
    assert vol.shape == (3, 4, 5, 6)
    np.testing.assert_array_equal(vol.numpy(), data[:, :, :, 0, :].transpose(3, 2, 1, 0))


@pytest.mark.parametrize(
    ("shape", "words"),
    [((30,), "1D"), ((4, 4, 3, 2, 2), "5D")],
    ids=["1d", "5d-not-vector"],
)
def test_nifti_bad_dimensionality_rejected(tmp_path, shape, words):
    path = write_nifti_array(tmp_path / "bad.nii", np.zeros(shape, np.float32))
    with pytest.raises(InvalidImageError, match=words) as info:
        read_volume(path)
    assert info.value.path == str(path)


def test_nifti_time_series_rejected(nibabel_data):
    path = nibabel_data / "functional.nii"
    assert nib.load(path).shape == (17, 21, 3, 20)
    with pytest.raises(InvalidImageError, match="20 channels.*time series") as info:
        read_volume(path)
    assert info.value.path == str(path)


def _write_nifti_without_orientation(path: Path, zooms: tuple[float, float, float]) -> Path:
    """A NIfTI whose only geometry is pixdim (qform_code = sform_code = 0)."""
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), None), path)
    raw = bytearray(path.read_bytes())
    raw[80:92] = struct.pack("<3f", *zooms)  # pixdim[1:4]
    path.write_bytes(bytes(raw))
    return path


def test_nifti_pixdim_only_geometry_is_read(tmp_path):
    vol = read_volume(_write_nifti_without_orientation(tmp_path / "ok.nii", (0.5, 0.75, 2.0)))
    assert vol.spacing == pytest.approx((2.0, 0.75, 0.5))


@pytest.mark.parametrize("zooms", [(0.0, 1.0, 1.0), (1.0, 1.0, -2.0)], ids=["zero", "negative"])
def test_nifti_non_positive_pixdim_rejected(tmp_path, zooms):
    """nibabel's loader silently rewrites such pixdims (0 -> 1, -2 -> 2); spadkit must refuse them."""
    path = _write_nifti_without_orientation(tmp_path / "bad.nii", zooms)
    with pytest.raises(InvalidImageError, match="spacing") as info:
        read_volume(path)
    assert info.value.path == str(path)


@pytest.fixture
def real_nifti_gz(tmp_path, mni_t1_path) -> Path:
    """A small real .nii.gz: a 40 x 40 x 30 crop of the MNI T1 (noisy enough to compress poorly)."""
    image = nib.load(mni_t1_path)
    crop = np.asarray(image.dataobj[80:120, 100:140, 70:100])
    return write_nifti_array(tmp_path / "crop.nii.gz", crop, image.affine)


def test_truncated_nifti_gz_fails_on_compute_naming_file(tmp_path, real_nifti_gz):
    path = _truncate(real_nifti_gz, tmp_path / "cut.nii.gz", 0.5)
    vol = read_volume(path)  # the header is intact: reading is lazy
    with pytest.raises(CorruptFileError, match="truncated") as info:
        vol.numpy()
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_data_fails_on_compute(tmp_path, rng, suffix):
    src = write_nifti_array(tmp_path / f"full{suffix}", rng.normal(size=(30, 20, 10)).astype(np.float32))
    path = _truncate(src, tmp_path / f"cut{suffix}", 0.6)
    with pytest.raises(CorruptFileError) as info:
        read_volume(path).numpy()
    assert info.value.path == str(path)


@pytest.mark.parametrize(("suffix", "keep"), [(".nii", 200), (".nii.gz", 30)])
def test_nifti_cut_inside_header_raises_corrupt_at_read(tmp_path, real_nifti_gz, suffix, keep):
    src = real_nifti_gz
    if suffix == ".nii":
        src = write_nifti_array(tmp_path / "crop.nii", np.asanyarray(nib.load(real_nifti_gz).dataobj))
    path = _truncate(src, tmp_path / f"cut{suffix}", keep)
    with pytest.raises(CorruptFileError) as info:
        read_volume(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_write_nifti_round_trip(tmp_path, rng, channels, suffix):
    data = rng.normal(size=(channels, 5, 6, 7)).astype(np.float32)
    affine = np.array([[0.0, 0.0, -2.5, 10.0], [0.9, 0.1, 0.0, -20.0], [-0.1, 0.9, 0.0, 30.0], [0, 0, 0, 1]])
    written = write_nifti(Volume(data, affine), tmp_path / "sub" / f"out{suffix}")
    assert written == tmp_path / "sub" / f"out{suffix}"
    back = read_volume(written)
    assert back.shape == data.shape
    np.testing.assert_array_equal(back.numpy(), data)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    assert sorted(p.name for p in written.parent.iterdir()) == [f"out{suffix}"]


def test_write_nifti_is_atomic_when_save_fails(tmp_path, monkeypatch, rng):
    target = tmp_path / "out.nii.gz"
    write_nifti(Volume(rng.normal(size=(3, 4, 5)).astype(np.float32)), target)
    before = target.read_bytes()
    partial_paths = []

    def failing_save(image, filename):
        partial_paths.append(Path(filename))
        Path(filename).write_bytes(before[: len(before) // 3])
        raise OSError("No space left on device")

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        write_nifti(Volume(np.zeros((3, 4, 5), np.float32)), target)
    assert partial_paths and partial_paths[0] != target
    assert partial_paths[0].parent == tmp_path
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


# --------------------------------------------------------------------------- DICOM


def test_dicom_ct_small(pydicom_data):
    path = pydicom_data / "CT_small.dcm"
    vol = read_volume(path)
    assert vol.modality == "CT"
    assert vol.shape == (1, 1, 128, 128)
    assert vol.dtype == np.int16
    data = vol.numpy()
    assert (int(data.min()), int(data.max())) == (-896, 1167)
    assert vol.spacing[1:] == pytest.approx((0.661468, 0.661468))
    assert vol.origin == pytest.approx((158.135803, 179.035797, -75.699997))
    assert vol.orientation == "LPS"
    assert vol.meta["series_uid"] == pydicom.dcmread(path).SeriesInstanceUID


def test_dicom_truncated_raises_corrupt_naming_file(pydicom_data):
    path = pydicom_data / "MR_truncated.dcm"
    with pytest.raises(CorruptFileError) as info:
        read_volume(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


SLICE_GAP_MM = 2.5


def _write_series(
    folder: Path,
    source: Path,
    depths: list[int],
    *,
    series_uid: str,
    rng: np.random.Generator,
    description: str = "axial",
) -> dict[int, Path]:
    """Write CT_small copies at ``depth * 2.5`` mm along z, marked by pixel (0, 0) = 100 * depth.

    File names are random, so name order says nothing about position.
    """
    template = pydicom.dcmread(source)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for depth in rng.permutation(depths):
        ds = copy.deepcopy(template)  # Dataset.copy() shares elements with the template
        x, y, z = (float(v) for v in template.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + SLICE_GAP_MM * int(depth)]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description
        ds.InstanceNumber = int(depth) + 1
        pixels = template.pixel_array.copy()
        pixels[0, 0] = 100 * int(depth)
        ds.PixelData = pixels.tobytes()
        written[int(depth)] = folder / f"{int(rng.integers(10**12)):012d}.dcm"  # seeded: name order is not depth order
        ds.save_as(written[int(depth)])
    return written



def test_dicom_series_sorted_by_position(tmp_path, pydicom_data, rng):
    uid = generate_uid()
    files = _write_series(tmp_path / "series", pydicom_data / "CT_small.dcm", [0, 1, 2, 3, 4], series_uid=uid, rng=rng)
    assert sorted(files, key=lambda d: files[d].name) != [0, 1, 2, 3, 4]
    (tmp_path / "series" / "README.txt").write_text("exported by PACS\n")
    vol = read_volume(tmp_path / "series")
    assert vol.shape == (1, 5, 128, 128)
    assert vol.modality == "CT"
    assert vol.meta["num_slices"] == 5
    assert vol.meta["series_uid"] == uid
    data = vol.numpy()
    np.testing.assert_array_equal(data[0, :, 0, 0], np.arange(5) * 100 - 1024)  # rescale applied
    assert vol.spacing == pytest.approx((SLICE_GAP_MM, 0.661468, 0.661468))
    lowest = np.array(pydicom.dcmread(files[0]).ImagePositionPatient, dtype=float)
    assert vol.origin == pytest.approx((-lowest[0], -lowest[1], lowest[2]))
    np.testing.assert_allclose(vol.affine[:3, :3], np.diag([-0.661468, -0.661468, SLICE_GAP_MM]), atol=1e-6)
    # the centre of the last slice lies 4 gaps above the first, in RAS
    top = vol.affine @ [0, 0, 4, 1]
    assert top[:3] == pytest.approx((-lowest[0], -lowest[1], lowest[2] + 4 * SLICE_GAP_MM))


def test_dicom_series_missing_slice_rejected(tmp_path, pydicom_data, rng):
    _write_series(tmp_path, pydicom_data / "CT_small.dcm", [0, 1, 2, 4, 5], series_uid=generate_uid(), rng=rng)
    with pytest.raises(InvalidImageError, match="uneven slice spacing") as info:
        read_volume(tmp_path)
    assert info.value.path == str(tmp_path)


@pytest.fixture
def two_series(tmp_path, pydicom_data, rng) -> tuple[Path, str, str]:
    """A folder holding a 3-slice and a 4-slice series of CT_small copies."""
    uid_a, uid_b = generate_uid(), generate_uid()
    ct = pydicom_data / "CT_small.dcm"
    _write_series(tmp_path / "a", ct, [0, 1, 2], series_uid=uid_a, rng=rng, description="soft tissue")
    _write_series(tmp_path / "b", ct, [0, 1, 2, 3], series_uid=uid_b, rng=rng, description="bone")
    return tmp_path, uid_a, uid_b


def test_dicom_two_series_rejected_listing_both(two_series):
    folder, uid_a, uid_b = two_series
    with pytest.raises(InvalidImageError, match="2 series") as info:
        read_volume(folder)
    message = str(info.value)
    assert f"{uid_a} (3 files, soft tissue)" in message
    assert f"{uid_b} (4 files, bone)" in message
    assert "series_uid=" in message
    with pytest.raises(InvalidImageError, match="not in the folder"):
        read_volume(folder, series_uid="1.2.3.4")


def test_dicom_series_uid_selects_one(two_series):
    folder, uid_a, uid_b = two_series
    assert read_volume(folder, series_uid=uid_a).spatial_shape == (3, 128, 128)
    assert read_volume(folder, series_uid=uid_b).meta["series_uid"] == uid_b


def test_dicom_folder_skips_non_dicom_files(tmp_path, pydicom_data):
    shutil.copy(pydicom_data / "CT_small.dcm", tmp_path / "CT_small.dcm")
    (tmp_path / "README.txt").write_text("exported by PACS\n")
    vol = read_volume(tmp_path)
    assert (vol.modality, vol.shape, vol.meta["num_slices"]) == ("CT", (1, 1, 128, 128), 1)


def test_dicom_folder_without_images_rejected(tmp_path):
    (tmp_path / "README.txt").write_text("nothing here\n")
    with pytest.raises(InvalidImageError, match="no DICOM image files"):
        read_volume(tmp_path)


@pytest.mark.parametrize(
    ("slope", "intercept", "dtype"),
    [(2.0, -100.0, np.int16), (0.5, 10.25, np.float32), (1.0, 0.0, np.int16)],
)
def test_dicom_rescale_slope_intercept_applied(tmp_path, pydicom_data, slope, intercept, dtype):
    ds = pydicom.dcmread(pydicom_data / "CT_small.dcm")
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(tmp_path / "rescaled.dcm")
    vol = read_volume(tmp_path / "rescaled.dcm")
    assert vol.dtype == dtype
    np.testing.assert_allclose(vol.numpy()[0, 0], ds.pixel_array * slope + intercept)


def test_extensionless_dicom_detected(tmp_path, pydicom_data):
    path = tmp_path / "IM0001"
    shutil.copy(pydicom_data / "CT_small.dcm", path)
    assert detect_format(path) == "dicom"
    vol = read_volume(path)
    assert (vol.modality, vol.shape) == ("CT", (1, 1, 128, 128))


# --------------------------------------------------------------------------- NRRD


def test_nrrd_lps_geometry_converted_to_ras(tmp_path, rng):
    data = rng.integers(-1000, 1000, (7, 6, 5)).astype(np.int16)  # (x, y, z) as in the header
    directions = np.array([[0.0, 0.6, 0.0], [-0.8, 0.0, 0.0], [0.0, 0.0, 2.5]])  # rows: axis vectors in LPS
    origin = np.array([10.0, -20.0, 30.0])
    path = tmp_path / "ct.nrrd"
    nrrd.write(str(path), data, {"space": "left-posterior-superior", "space directions": directions, "space origin": origin})
    vol = read_volume(path)
    expected = np.eye(4)
    expected[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ directions.T
    expected[:3, 3] = (-10.0, 20.0, 30.0)
    np.testing.assert_allclose(vol.affine, expected)
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.6))
    assert vol.orientation == "PRS"  # LPS +y (posterior) stays P, LPS -x (right) is R
    assert vol.shape == (1, 5, 6, 7)
    np.testing.assert_array_equal(vol.numpy()[0], data.transpose(2, 1, 0))


def test_nrrd_vector_axis_becomes_channels(tmp_path, rng):
    data = rng.normal(size=(3, 7, 6, 5)).astype(np.float32)  # (c, x, y, z)
    directions = np.array([[np.nan] * 3, [0.5, 0, 0], [0, 0.5, 0], [0, 0, 1.5]])
    path = tmp_path / "rgb.nrrd"
    header = {"space": "right-anterior-superior", "space directions": directions, "kinds": ["vector", "domain", "domain", "domain"]}
    nrrd.write(str(path), data, header)
    vol = read_volume(path)
    assert vol.shape == (3, 5, 6, 7)
    assert vol.spacing == pytest.approx((1.5, 0.5, 0.5))
    np.testing.assert_array_equal(vol.numpy(), data.transpose(0, 3, 2, 1))


@pytest.mark.parametrize("cut", ["half-data", "header"])
def test_truncated_nrrd_raises_corrupt(tmp_path, rng, cut):
    """Cut a raw float32 NRRD half-way through its data (on a voxel boundary) or inside its header."""
    src = tmp_path / "full.nrrd"
    nrrd.write(str(src), rng.normal(size=(20, 20, 10)).astype(np.float32), {"encoding": "raw"})
    header_bytes = src.read_bytes().index(b"\n\n") + 2
    keep = {"half-data": header_bytes + 2000 * 4, "header": header_bytes // 2}[cut]
    path = _truncate(src, tmp_path / "cut.nrrd", keep)
    with pytest.raises(CorruptFileError) as info:
        read_volume(path)
    assert info.value.path == str(path)


# --------------------------------------------------------------------------- 2D images


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_grey(tmp_path, rng, dtype):
    pixels = rng.integers(0, np.iinfo(dtype).max, (48, 64), endpoint=True).astype(dtype)
    Image.fromarray(pixels).save(tmp_path / "grey.png")
    vol = read_volume(tmp_path / "grey.png", modality="XR")
    assert vol.shape == (1, 1, 48, 64)
    assert vol.dtype == dtype
    assert vol.modality == "XR"
    np.testing.assert_array_equal(vol.numpy()[0, 0], pixels)


@pytest.fixture
def rgb(rng) -> np.ndarray:
    return rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("alpha", [False, True], ids=["rgb", "rgba-alpha-dropped"])
def test_colour_image(tmp_path, rng, rgb, alpha, suffix):
    pixels = np.dstack([rgb, rng.integers(0, 256, rgb.shape[:2]).astype(np.uint8)]) if alpha else rgb
    path = tmp_path / f"colour{suffix}"
    if suffix == ".png":
        Image.fromarray(pixels).save(path)
    else:
        tifffile.imwrite(path, pixels, photometric="rgb")
    vol = read_volume(path)
    assert vol.shape == (3, 1, 40, 50)
    np.testing.assert_array_equal(vol.numpy()[:, 0], rgb.transpose(2, 0, 1))


def test_png_palette_expanded_to_rgb(tmp_path, rgb):
    image = Image.fromarray(rgb).quantize(colors=16)
    assert image.mode == "P"
    image.save(tmp_path / "palette.png")
    vol = read_volume(tmp_path / "palette.png")
    assert vol.shape == (3, 1, 40, 50)
    np.testing.assert_array_equal(vol.numpy()[:, 0], np.asarray(image.convert("RGB")).transpose(2, 0, 1))


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3)])
def test_jpeg(tmp_path, mode, channels):
    y, x = np.mgrid[0:60, 0:80]
    grey = (2 * x + y).astype(np.uint8)  # smooth: survives JPEG almost unchanged
    pixels = grey if mode == "L" else np.dstack([grey, grey[::-1], 255 - grey])
    Image.fromarray(pixels).save(tmp_path / "photo.jpeg", quality=95)
    vol = read_volume(tmp_path / "photo.jpeg")
    assert vol.shape == (channels, 1, 60, 80)
    assert vol.dtype == np.uint8
    expected = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
    assert np.abs(vol.numpy()[:, 0].astype(int) - expected).mean() < 2


def test_tiff_2d(tmp_path, rng):
    pixels = rng.integers(0, 4096, (30, 20)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "slide.tif", pixels)
    vol = read_volume(tmp_path / "slide.tif")
    assert vol.shape == (1, 1, 30, 20)
    assert vol.meta["format"] == "tiff"
    np.testing.assert_array_equal(vol.numpy()[0, 0], pixels)


def test_tiff_multipage_stack(tmp_path, rng):
    pages = rng.integers(0, 4096, (6, 30, 20)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tiff", pages, photometric="minisblack")
    assert len(tifffile.TiffFile(tmp_path / "stack.tiff").pages) == 6
    vol = read_volume(tmp_path / "stack.tiff")
    assert vol.shape == (1, 6, 30, 20)
    assert not vol.is_2d
    np.testing.assert_array_equal(vol.numpy()[0], pages)


@pytest.mark.parametrize(
    ("name", "shape", "spacing", "expected"),
    [
        ("grey.png", (30, 20), (0.5, 0.25), (1.0, 0.5, 0.25)),
        ("slide.tif", (30, 20), (0.5, 0.25), (1.0, 0.5, 0.25)),
        ("stack.tif", (4, 30, 20), (3.0, 0.5, 0.25), (3.0, 0.5, 0.25)),
    ],
)
def test_image2d_spacing_given_or_assumed(tmp_path, rng, name, shape, spacing, expected):
    path = tmp_path / name
    pixels = rng.integers(0, 255, shape).astype(np.uint8)
    if name.endswith(".png"):
        Image.fromarray(pixels).save(path)
    else:
        tifffile.imwrite(path, pixels, photometric="minisblack")
    given = read_volume(path, spacing=spacing)
    assert given.spacing == pytest.approx(expected)
    assert given.meta["spacing_assumed"] is False
    default = read_volume(path)
    assert default.spacing == (1.0, 1.0, 1.0)
    assert default.meta["spacing_assumed"] is True


def test_tiff_resolution_in_centimetres_gives_mm(tmp_path):
    tifffile.imwrite(tmp_path / "scan.tif", np.zeros((10, 12), np.uint8), resolution=(20.0, 40.0), resolutionunit="CENTIMETER")
    vol = read_volume(tmp_path / "scan.tif")
    assert vol.spacing == pytest.approx((1.0, 0.25, 0.5))
    assert vol.meta["spacing_assumed"] is False


def test_truncated_png_raises_corrupt(tmp_path, rng):
    Image.fromarray(rng.integers(0, 255, (64, 80)).astype(np.uint8)).save(tmp_path / "full.png")
    path = _truncate(tmp_path / "full.png", tmp_path / "cut.png", 0.5)
    with pytest.raises(CorruptFileError, match="truncated") as info:
        read_volume(path)
    assert info.value.path == str(path)


# --------------------------------------------------------------------------- dispatch


def test_unknown_suffix_raises_unsupported_listing_formats(tmp_path):
    path = tmp_path / "points.xyz"
    path.write_text("1.0 2.0 3.0\n" * 200)
    with pytest.raises(UnsupportedFormatError) as info:
        read_volume(path)
    message = str(info.value)
    assert str(path) in message
    assert info.value.path == str(path)
    for suffix in SUPPORTED_SUFFIXES:
        assert suffix in message


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("a.nii", "nifti"), ("A.NII.GZ", "nifti"), ("b.nrrd", "nrrd"), ("c.nhdr", "nrrd"), ("d.JPG", "image2d"), ("e.tiff", "image2d"), ("f.dcm", "dicom")],
)
def test_detect_format_by_suffix(tmp_path, name, fmt):
    (tmp_path / name).write_bytes(b"")
    assert detect_format(tmp_path / name) == fmt


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        read_volume(tmp_path / "missing.nii.gz")


# --------------------------------------------------------------------------- 2D conventions (PNG vs DICOM)


@pytest.fixture
def xray(rng) -> np.ndarray:
    """A 12-bit 'radiograph' (rows, columns) with no symmetry, so any flip or rotation shows."""
    pixels = rng.integers(0, 4096, (30, 40)).astype(np.uint16)
    pixels[:5, :8] = 4095  # a bright block in the top-left corner
    return pixels


def _png_and_dicom(tmp_path: Path, pixels: np.ndarray, dicom_pixels: np.ndarray | None = None, **tags) -> tuple[Volume, Volume]:
    Image.fromarray(pixels).save(tmp_path / "xr.png")
    radiograph_dataset(pixels if dicom_pixels is None else dicom_pixels, bits_stored=12, **tags).save_as(tmp_path / "xr.dcm", enforce_file_format=True)
    return read_volume(tmp_path / "xr.png"), read_volume(tmp_path / "xr.dcm")


def _assert_same_storage(a: Volume, b: Volume) -> None:
    """Both land identically where ingest puts them (Volume.canonical())."""
    a, b = a.canonical(), b.canonical()
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(a.affine, b.affine)


def test_dicom_radiograph_without_geometry_lands_like_png(tmp_path, xray):
    png, dcm = _png_and_dicom(tmp_path, xray)
    assert dcm.modality == "XR" and dcm.shape == (1, 1, 30, 40)
    assert dcm.orientation == png.orientation == "RAS"
    _assert_same_storage(png, dcm)
    np.testing.assert_array_equal(dcm.canonical().numpy()[0, 0], xray)  # stored as displayed, not rotated
    assert "patient_orientation" not in dcm.meta


def test_dicom_radiograph_pixel_spacing_kept_in_png_convention(tmp_path, xray):
    _, dcm = _png_and_dicom(tmp_path, xray, PixelSpacing=[0.2, 0.1])
    assert dcm.spacing[1:] == pytest.approx((0.2, 0.1))
    assert dcm.meta["spacing_assumed"] is False
    np.testing.assert_array_equal(dcm.canonical().numpy()[0, 0], xray)


@pytest.mark.parametrize(
    ("orientation", "stored"),
    [
        (["L", "F"], lambda p: p),
        (["R", "F"], lambda p: p[:, ::-1]),  # mirrored: the patient's right on the right
        (["L", "H"], lambda p: p[::-1]),  # upside down
        (["R", "H"], lambda p: p[::-1, ::-1]),
        (["F", "L"], lambda p: p.T),  # rotated: rows run along the body axis
        (["H", "R"], lambda p: p[::-1, ::-1].T),
        (["P", "F"], lambda p: p),  # lateral, already in display orientation
        (["A", "F"], lambda p: p[:, ::-1]),
        (["LF", "FR"], lambda p: p),  # oblique letters: the first one counts
    ],
    ids=["LF", "RF", "LH", "RH", "FL", "HR", "PF", "AF", "oblique"],
)
def test_dicom_patient_orientation_brings_pixels_to_display_orientation(tmp_path, xray, orientation, stored):
    """A DICOM storing the displayed image ``xray`` in another orientation lands like the PNG of ``xray``."""
    png, dcm = _png_and_dicom(tmp_path, xray, np.ascontiguousarray(stored(xray)), PatientOrientation=orientation)
    _assert_same_storage(png, dcm)
    assert dcm.meta["patient_orientation"] == "\\".join(orientation)


def test_dicom_patient_orientation_transposed_swaps_pixel_spacing(tmp_path, xray):
    _, dcm = _png_and_dicom(tmp_path, xray, np.ascontiguousarray(xray.T), PatientOrientation=["F", "L"], PixelSpacing=[0.3, 0.1])
    assert dcm.spacing[1:] == pytest.approx((0.1, 0.3))  # stored rows 0.3 mm apart become columns


def test_dicom_unusable_patient_orientation_warns_and_keeps_pixels(tmp_path, xray):
    with pytest.warns(UserWarning, match="PatientOrientation"):
        png, dcm = _png_and_dicom(tmp_path, xray, PatientOrientation=["L", "R"])
    _assert_same_storage(png, dcm)


@pytest.mark.parametrize(
    ("dtype", "bits", "expected"),
    [(np.uint16, 12, lambda p: 4095 - p), (np.uint8, 8, lambda p: 255 - p), (np.int16, 16, lambda p: -1 - p)],
)
def test_dicom_monochrome1_inverted_like_simpleitk(tmp_path, rng, dtype, bits, expected):
    pixels = rng.integers(0, 2 ** min(bits, 15), (20, 24)).astype(dtype)
    radiograph_dataset(pixels, photometric="MONOCHROME1", bits_stored=bits).save_as(tmp_path / "m1.dcm", enforce_file_format=True)
    vol = read_volume(tmp_path / "m1.dcm")
    assert vol.meta["monochrome1_inverted"] is True
    assert vol.dtype == dtype
    np.testing.assert_array_equal(vol.numpy()[0, 0], expected(pixels.astype(np.int64)))


def test_dicom_monochrome2_not_inverted(tmp_path, xray):
    radiograph_dataset(xray, bits_stored=12).save_as(tmp_path / "m2.dcm", enforce_file_format=True)
    vol = read_volume(tmp_path / "m2.dcm")
    assert vol.meta["monochrome1_inverted"] is False
    np.testing.assert_array_equal(vol.numpy()[0, 0], xray)


def test_dicom_without_pixel_spacing_marked_assumed(tmp_path, xray, pydicom_data):
    radiograph_dataset(xray).save_as(tmp_path / "xr.dcm", enforce_file_format=True)
    assert read_volume(tmp_path / "xr.dcm").meta["spacing_assumed"] is True
    assert read_volume(pydicom_data / "CT_small.dcm").meta["spacing_assumed"] is False


@pytest.mark.parametrize(("suffix", "kwargs"), [(".jpg", {"quality": 90}), (".png", {}), (".tif", {})])
def test_grey_image_saved_as_rgb_collapses_to_one_channel(tmp_path, suffix, kwargs):
    y, x = np.mgrid[0:60, 0:80]
    grey = (2 * x + y).astype(np.uint8)
    path = tmp_path / f"xr{suffix}"
    Image.fromarray(np.dstack([grey] * 3)).save(path, **kwargs)
    assert np.asarray(Image.open(path)).shape == (60, 80, 3)
    vol = read_volume(path)
    assert vol.shape == (1, 1, 60, 80)
    assert vol.meta["channels_collapsed"] is True
    assert np.abs(vol.numpy()[0, 0].astype(int) - grey).mean() < 2


def test_colour_image_with_one_differing_pixel_keeps_three_channels(tmp_path):
    pixels = np.full((10, 12, 3), 100, np.uint8)
    pixels[4, 5, 2] = 101
    Image.fromarray(pixels).save(tmp_path / "c.png")
    vol = read_volume(tmp_path / "c.png")
    assert vol.shape == (3, 1, 10, 12)
    assert vol.meta["channels_collapsed"] is False


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nrrd", "xr.png", "slide.tif", "CT_small.dcm"])
def test_every_reader_records_its_sources(tmp_path, pydicom_data, rng, name):
    path = tmp_path / name
    data = rng.integers(0, 255, (6, 5, 4)).astype(np.uint8)
    if name.endswith(".nii.gz"):
        write_nifti_array(path, data)
    elif name.endswith(".nrrd"):
        nrrd.write(str(path), data)
    elif name.endswith(".png"):
        Image.fromarray(data[0]).save(path)
    elif name.endswith(".tif"):
        tifffile.imwrite(path, data[0])
    else:
        shutil.copy(pydicom_data / name, path)
    assert read_volume(path).meta["sources"] == [str(path)]


def test_dicom_series_sources_list_every_slice(tmp_path, pydicom_data, rng):
    files = _write_series(tmp_path / "s", pydicom_data / "CT_small.dcm", [0, 1, 2], series_uid=generate_uid(), rng=rng)
    assert read_volume(tmp_path / "s").meta["sources"] == [str(files[d]) for d in (0, 1, 2)]


@pytest.mark.parametrize(
    ("iop", "stored"),
    [
        ([1, 0, 0, 0, 0, -1], lambda p: p),  # rows toward the patient's left, columns toward the feet: L\F
        ([-1, 0, 0, 0, 0, -1], lambda p: p[:, ::-1]),  # R\F
        ([0, 0, -1, 0.998, 0.06, 0], lambda p: p.T),  # F\L, slightly oblique
    ],
    ids=["LF", "RF", "FL-oblique"],
)
def test_dicom_projection_with_orientation_stays_2d_like_png(tmp_path, xray, iop, stored):
    """A DX image with ImageOrientationPatient (the detector's) is stored 2D like the PNG, not as a coronal slab."""
    png, dcm = _png_and_dicom(tmp_path, xray, np.ascontiguousarray(stored(xray)), ImageOrientationPatient=iop, ImagePositionPatient=[0, 0, 0])
    assert dcm.canonical().is_2d
    _assert_same_storage(png, dcm)


def test_dicom_ct_slice_keeps_patient_geometry(pydicom_data):
    vol = read_volume(pydicom_data / "CT_small.dcm")
    assert vol.orientation == "LPS" and "patient_orientation" not in vol.meta
