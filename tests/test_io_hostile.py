"""Hostile and inconsistent files: the decoded-size budget, NRRD data-file confinement, error hygiene.

Every hostile file here is small on disk and claims far more voxels than it holds.
Reads run under an address-space cap, so a reader that decoded before checking
the header would fail with a (converted) MemoryError, whose message differs from
the budget's "refused before decoding".
"""

from __future__ import annotations

import gzip
import resource
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image

from spadkit.errors import CorruptFileError, InvalidImageError, SpadkitError, UnsupportedFormatError
from spadkit.io import budget, read_volume
from spadkit.io._guard import reading
from spadkit.io.budget import (
    DecodedSizeError,
    check_decoded_size,
    max_decoded_bytes,
    parse_bytes,
    set_max_decoded_bytes,
)
from tests._dicom import radiograph_dataset

REFUSED = "refused before decoding"


@contextmanager
def address_space_cap(extra: int = 1 << 30) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``extra`` bytes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmSize:"))
    cap = vm_kib * 1024 + extra
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture
def small_budget(monkeypatch) -> int:
    """A 1 MiB decoded-size budget through the environment variable."""
    monkeypatch.setenv(budget.ENV_VAR, "1M")
    return 1 << 20


def _refused(path: Path, **options) -> DecodedSizeError:
    with address_space_cap(), pytest.raises(DecodedSizeError, match=REFUSED) as info:
        read_volume(path, **options)
    assert info.value.path == str(path)
    assert budget.ENV_VAR in info.value.fix and "set_max_decoded_bytes" in info.value.fix
    return info.value


# --------------------------------------------------------------------------- the budget itself


@pytest.mark.parametrize(("text", "size"), [("123", 123), ("1K", 1024), ("512M", 512 << 20), ("32G", 32 << 30), ("1.5GiB", 3 << 29), ("2t", 2 << 40)])
def test_parse_bytes(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["", "0", "-5", "lots", "12X"])
def test_parse_bytes_rejects_non_sizes_naming_the_setting(text):
    with pytest.raises(SpadkitError, match=budget.ENV_VAR):
        parse_bytes(text)


def test_budget_precedence_setting_then_env_then_default(monkeypatch):
    monkeypatch.delenv(budget.ENV_VAR, raising=False)
    default = max_decoded_bytes()
    assert default == budget.default_max_decoded_bytes()
    assert 0 < default <= budget.DEFAULT_CAP_BYTES
    monkeypatch.setenv(budget.ENV_VAR, "3G")
    assert max_decoded_bytes() == 3 << 30
    set_max_decoded_bytes("5M")
    try:
        assert max_decoded_bytes() == 5 << 20
    finally:
        set_max_decoded_bytes(None)
    assert max_decoded_bytes() == 3 << 30


def test_check_decoded_size_counts_bytes_without_overflow(small_budget):
    assert check_decoded_size((1, 512, 512), np.float32, "x.nii") == small_budget
    with pytest.raises(DecodedSizeError, match=r"4096x4096x4096 voxels of float64, 512 GiB") as info:
        check_decoded_size((4096, 4096, 4096), np.float64, "x.nii")  # 2**39 bytes
    assert "SPADKIT_MAX_DECODED_BYTES=513G" in info.value.fix


def test_memory_error_while_decoding_becomes_budget_error():
    with pytest.raises(DecodedSizeError, match="ran out of memory") as info, reading("ct.nii.gz"):
        raise MemoryError("Unable to allocate 8.00 GiB")
    assert info.value.path == "ct.nii.gz"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_memory_error_inside_a_reader_names_the_file(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "xr.png")

    def no_memory(self, *args):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "load", no_memory)
    with pytest.raises(DecodedSizeError, match="ran out of memory") as info:
        read_volume(tmp_path / "xr.png")
    assert info.value.path == str(tmp_path / "xr.png")


# --------------------------------------------------------------------------- bombs, one per reader


def _nifti_claiming(path: Path, shape: tuple[int, ...], payload: int = 1 << 16) -> Path:
    """A .nii.gz whose header claims ``shape`` uint8 voxels, followed by ``payload`` zero bytes."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + bytes(4) + bytes(payload))
    return path


def test_nifti_gz_claiming_64_gib_refused_with_default_budget(tmp_path, monkeypatch):
    monkeypatch.delenv(budget.ENV_VAR, raising=False)
    path = _nifti_claiming(tmp_path / "bomb.nii.gz", (4096, 4096, 4096))
    assert path.stat().st_size < 2000
    error = _refused(path)
    assert "4096x4096x4096 voxels of uint8, 64 GiB" in str(error)


def test_nifti_gz_over_small_budget_refused(tmp_path, small_budget):
    _refused(_nifti_claiming(tmp_path / "bomb.nii.gz", (256, 256, 256)))  # 16 MiB of zeros, 16 kB on disk


def test_nifti_within_budget_still_reads(tmp_path, small_budget, rng):
    data = rng.integers(0, 255, (64, 64, 64)).astype(np.uint8)  # 256 KiB
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "ok.nii.gz")
    np.testing.assert_array_equal(read_volume(tmp_path / "ok.nii.gz").numpy()[0], data.T)


def test_nrrd_gzip_claiming_more_than_budget_refused(tmp_path, small_budget):
    path = tmp_path / "bomb.nrrd"
    header = b"NRRD0004\ntype: float\ndimension: 3\nsizes: 512 512 512\nendian: little\nencoding: gzip\n\n"
    path.write_bytes(header + gzip.compress(bytes(1 << 20)))
    assert "512x512x512 voxels of float32, 512 MiB" in str(_refused(path))


def test_nrrd_gzip_stream_longer_than_header_is_not_inflated(tmp_path, rng):
    """A header declaring 1000 voxels over a stream that inflates to 256 MiB: stop after the declared bytes."""
    path = tmp_path / "long.nrrd"
    stream = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    chunk = bytes(1 << 20)
    compressed = b"".join(stream.compress(chunk) for _ in range(256)) + stream.flush()
    assert len(compressed) < 300_000
    path.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 10 10 10\nencoding: gzip\n\n" + compressed)
    with address_space_cap(256 << 20), pytest.raises(CorruptFileError, match="more than the 1000 bytes the header declares") as info:
        read_volume(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("encoding", ["gzip", "bzip2"])
def test_nrrd_compressed_with_byte_skip_still_reads(tmp_path, rng, encoding):
    data = rng.integers(0, 255, (5, 4, 3)).astype(np.uint8)  # (x, y, z)
    path = tmp_path / f"ok_{encoding}.nrrd"
    nrrd.write(str(path), data, {"encoding": encoding, "space": "right-anterior-superior", "space directions": np.eye(3)})
    np.testing.assert_array_equal(read_volume(path).numpy()[0], data.T)


def test_tiled_tiff_over_budget_refused(tmp_path, small_budget):
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, np.zeros((4096, 4096), np.uint8), tile=(256, 256), compression="zlib")  # 16 MiB, ~24 kB on disk
    assert path.stat().st_size < 100_000
    assert "4096x4096 voxels of uint8" in str(_refused(path))


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny greyscale PNG whose IHDR chunk is rewritten to claim ``width x height`` pixels."""
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))  # CRC over chunk type and data
    path.write_bytes(bytes(raw))
    return path


def test_png_over_budget_refused(tmp_path, small_budget):
    assert "1x9000x9000 voxels of uint8" in str(_refused(_png_claiming(tmp_path / "xr.png", 9000, 9000)))


def test_png_over_pillow_bomb_limit_gets_clear_error(tmp_path):
    path = _png_claiming(tmp_path / "bomb.png", 60000, 60000)
    with address_space_cap(), pytest.raises(DecodedSizeError, match="decompression bomb") as info:
        read_volume(path)
    assert info.value.path == str(path)
    assert "MAX_IMAGE_PIXELS" in info.value.fix


def _ct_small(pydicom_data: Path) -> pydicom.Dataset:
    return pydicom.dcmread(pydicom_data / "CT_small.dcm")


def test_dicom_claiming_huge_image_refused_before_decoding(tmp_path, pydicom_data, small_budget):
    ds = _ct_small(pydicom_data)
    ds.NumberOfFrames = 200  # 200 x 128 x 128 float32 after rescale: 12.5 MiB
    ds.save_as(tmp_path / "frames.dcm")
    assert "1x200x128x128 voxels of float32" in str(_refused(tmp_path / "frames.dcm"))


def test_dicom_series_total_checked_before_reading_pixels(tmp_path, pydicom_data, monkeypatch):
    for i in range(3):
        ds = _ct_small(pydicom_data)
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * i]
        ds.save_as(tmp_path / f"{i}.dcm")
    monkeypatch.setenv(budget.ENV_VAR, str(2 * 128 * 128 * 4))  # two float32 slices fit, three do not
    error = _refused(tmp_path)
    assert "1x3x128x128 voxels" in str(error)


# --------------------------------------------------------------------------- inconsistent files


def test_dicom_pixel_data_longer_than_header_refused(tmp_path, pydicom_data):
    ds = _ct_small(pydicom_data)
    ds.PixelData = ds.PixelData + bytes(len(ds.PixelData))  # a second frame the header does not declare
    ds.save_as(tmp_path / "long.dcm")
    with pytest.raises(CorruptFileError, match=r"pixel data holds 65536 bytes, more than the 32768") as info:
        read_volume(tmp_path / "long.dcm")
    assert info.value.path == str(tmp_path / "long.dcm")
    assert "Rows" in str(info.value)


def test_dicom_odd_length_padding_byte_accepted(tmp_path):
    ds = radiograph_dataset(np.arange(15, dtype=np.uint8).reshape(3, 5))
    ds.PixelData = ds.PixelData + b"\0"  # 15 bytes padded to even length, as the standard requires
    ds.save_as(tmp_path / "odd.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(read_volume(tmp_path / "odd.dcm").numpy()[0, 0], np.arange(15).reshape(3, 5))


def test_tiff_zero_resolution_assumes_1mm_with_warning(tmp_path):
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, np.zeros((10, 12), np.uint8), resolution=((0, 1), (0, 1)), resolutionunit="CENTIMETER")
    with pytest.warns(UserWarning, match="unusable TIFF resolution"):
        vol = read_volume(path)
    assert vol.spacing == (1.0, 1.0, 1.0)
    assert vol.meta["spacing_assumed"] is True


# --------------------------------------------------------------------------- NRRD detached data files


def _nhdr(path: Path, data_file: str, extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n{extra}data file: {data_file}\n\n")
    return path


@pytest.fixture
def secret(tmp_path) -> Path:
    (tmp_path / "secret.txt").write_bytes(b"password=hunter2\n")
    return tmp_path / "secret.txt"


@pytest.mark.parametrize(
    ("data_file", "extra"),
    [("../secret.txt", ""), ("{secret}", ""), ("/etc/passwd", "byte skip: -1\n"), ("link.raw", "")],
    ids=["parent", "absolute", "etc-passwd", "symlink-out"],
)
def test_nrrd_data_file_outside_header_folder_refused(tmp_path, secret, data_file, extra):
    (tmp_path / "case").mkdir()
    (tmp_path / "case" / "link.raw").symlink_to(secret)
    path = _nhdr(tmp_path / "case" / "img.nhdr", data_file.format(secret=secret), extra)
    with pytest.raises(InvalidImageError, match="outside the header's folder") as info:
        read_volume(path)
    assert info.value.path == str(path)
    assert "allow_outside=True" in info.value.fix


def test_nrrd_data_file_outside_read_when_allowed_and_recorded(tmp_path, secret):
    path = _nhdr(tmp_path / "case" / "img.nhdr", "../secret.txt", "byte skip: 9\n")  # "password=" is 9 bytes
    vol = read_volume(path, allow_outside=True)
    assert vol.numpy().tobytes() == b"hunter2\n"
    assert vol.meta["sources"] == [str(path), str(secret.resolve())]


def test_nrrd_data_file_beside_or_below_header_read_and_recorded(tmp_path, rng):
    data = rng.integers(0, 255, 8).astype(np.uint8)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "img.raw").write_bytes(data.tobytes())
    path = _nhdr(tmp_path / "img.nhdr", "raw/img.raw")
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.numpy().ravel(), data)  # (C, Z, Y, X) in C order = the file's x-fastest order
    assert vol.meta["sources"] == [str(path), str((tmp_path / "raw" / "img.raw").resolve())]


@pytest.mark.parametrize("data_file", ["LIST\nslice1.raw\nslice2.raw", "slice%03d.raw 1 2 1"], ids=["list", "format"])
def test_nrrd_multi_file_data_refused(tmp_path, data_file):
    path = _nhdr(tmp_path / "img.nhdr", data_file)
    with pytest.raises(UnsupportedFormatError, match="multi-file NRRD") as info:
        read_volume(path)
    assert info.value.path == str(path)


def test_nrrd_missing_data_file_is_corrupt(tmp_path):
    path = _nhdr(tmp_path / "img.nhdr", "gone.raw")
    with pytest.raises(CorruptFileError, match="gone.raw"):
        read_volume(path)


def test_nrrd_attached_data_source_is_the_file(tmp_path, rng):
    nrrd.write(str(tmp_path / "a.nrrd"), rng.normal(size=(3, 4, 5)).astype(np.float32))
    assert read_volume(tmp_path / "a.nrrd").meta["sources"] == [str(tmp_path / "a.nrrd")]


def test_dicom_trailing_padding_shorter_than_a_frame_read_with_warning(pydicom_data):
    path = pydicom_data / "MR_small_padded.dcm"  # 128 bytes after a 64 x 64 x 16-bit image
    with pytest.warns(UserWarning, match=r"MR_small_padded.dcm: 128 bytes of padding"):
        vol = read_volume(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own padding warning
        expected = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(vol.numpy()[0, 0], expected)


def test_every_pydicom_test_file_reads_or_raises_a_clear_error(pydicom_data, recwarn):
    """No raw AttributeError/RuntimeError/InvalidDicomError from real files, readable or not."""
    outcomes = {}
    for path in sorted(pydicom_data.rglob("*.dcm")):
        try:
            outcomes[path.name] = read_volume(path).shape
        except SpadkitError as err:
            assert err.path == str(path) and err.fix
            outcomes[path.name] = type(err).__name__
    assert outcomes["CT_small.dcm"] == (1, 1, 128, 128)
    assert outcomes["badVR.dcm"] == outcomes["no_meta.dcm"] == "CorruptFileError"
    assert outcomes["rtplan.dcm"] == "CorruptFileError"  # no pixel data
    assert sum(isinstance(v, tuple) for v in outcomes.values()) >= 40
