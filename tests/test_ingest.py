"""Dask ingest of dataset folders into the store: layouts, checks, resume, fingerprint."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from spadkit.catalog import DatasetEntry
from spadkit.ingest import discover_cases, ingest
from spadkit.io import OMEZarrStore
from tests.conftest import write_nifti_array

LPS_2MM = np.diag([-2.0, -2.0, 2.0, 1.0])  # voxel axes point L, P, S


def _entry(**overrides) -> DatasetEntry:
    fields = dict(
        name="toy_msd",
        title="Toy decathlon task",
        modality=["MR", "MR"],
        body_region="brain",
        dimensionality=3,
        num_cases=3,
        label_classes={0: "background", 1: "tumour"},
        task=["segmentation"],
        license="CC-BY-SA-4.0",
        homepage="http://medicaldecathlon.com/",
        download_url=None,
        access="open",
        citation="Antonelli M. et al., The Medical Segmentation Decathlon, Nat Commun 2022.",
        file_format="nifti",
        layout="msd",
    )
    return DatasetEntry.model_validate({**fields, **overrides})


@pytest.fixture
def msd_folder(tmp_path, rng):
    """MSD layout: 2-channel 4D images (x, y, z, 2), labels, an unlabelled test case and macOS junk."""
    root = tmp_path / "Task99_Toy"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        image = rng.normal(100 + 10 * i, 5, size=(20, 18, 12, 2)).astype(np.float32)
        label = (image[..., 0] > 105).astype(np.uint8)
        write_nifti_array(root / "imagesTr" / f"toy_{i:03d}.nii.gz", image, LPS_2MM)
        write_nifti_array(root / "labelsTr" / f"toy_{i:03d}.nii.gz", label, LPS_2MM)
        (root / "imagesTr" / f"._toy_{i:03d}.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_nifti_array(root / "imagesTs" / "toy_100.nii.gz", rng.normal(size=(20, 18, 12, 2)).astype(np.float32), LPS_2MM)
    return root


def test_msd_layout_is_ingested_with_channels_labels_and_ras(msd_folder, tmp_path):
    url = str(tmp_path / "toy.zarr")
    report = ingest(msd_folder, url, entry=_entry(), progress=False)
    assert report.ok, report.summary()
    assert sorted(report.written) == ["toy_000", "toy_001", "toy_100"]
    store = OMEZarrStore(url)
    image = store.read_image("toy_000")
    assert image.shape == (2, 12, 18, 20)
    assert image.orientation == "RAS" and image.spacing == (2.0, 2.0, 2.0)
    assert image.modality == "MR"  # one code when every channel shares it
    attrs = store.case_attrs("toy_000")
    assert attrs["original_orientation"] == "LPS"
    # RAS storage flips x and y: the stored voxel (x, y) = (0, 0) is the source's (19, 17)
    source = nib.load(msd_folder / "imagesTr" / "toy_000.nii.gz").get_fdata()
    assert image.numpy()[1, 3, 0, 0] == pytest.approx(source[19, 17, 3, 1])
    label = store.read_label("toy_000")
    assert label.classes == {0: "background", 1: "tumour"}
    np.testing.assert_array_equal(label.numpy()[0] > 0, image.numpy()[0] > 105)
    assert store.label_names("toy_100") == []
    assert store.info["dataset"] == "toy_msd" and store.info["catalog_entry"]["layout"] == "msd"


def test_fingerprint_pools_intensity_exactly(msd_folder, tmp_path):
    url = str(tmp_path / "toy.zarr")
    ingest(msd_folder, url, entry=_entry(), progress=False)
    fp = OMEZarrStore(url).info["fingerprint"]
    assert fp["num_cases"] == 3
    assert fp["spacing_zyx_mm"]["median"] == [2.0, 2.0, 2.0]
    assert fp["shape_zyx"]["median"] == [12, 18, 20]
    channel1 = [nib.load(p).get_fdata()[..., 1] for p in sorted(msd_folder.glob("images*/toy_*.nii.gz"))]
    pooled = np.concatenate([c.ravel() for c in channel1])
    assert fp["intensity"]["1:MR"]["mean"] == pytest.approx(pooled.mean(), rel=1e-5)
    assert fp["intensity"]["1:MR"]["std"] == pytest.approx(pooled.std(), rel=1e-4)
    assert fp["intensity"]["1:MR"]["num_cases"] == 3


def test_rerun_skips_finished_cases_and_redoes_interrupted_ones(msd_folder, tmp_path, monkeypatch):
    url = str(tmp_path / "toy.zarr")
    import spadkit.io.omezarr as omezarr

    real_write = omezarr.OMEZarrStore.write_case

    def dies_on_toy_001(self, case_id, image, label=None, **kwargs):
        if case_id == "toy_001":  # arrays land, then the machine goes down before the marker
            group = self.root.create_group(case_id)
            group.create_array("0", shape=image.shape, dtype=image.dtype)
            raise OSError("No space left on device")
        return real_write(self, case_id, image, label, **kwargs)

    monkeypatch.setattr(omezarr.OMEZarrStore, "write_case", dies_on_toy_001)
    first = ingest(msd_folder, url, entry=_entry(), progress=False)
    assert set(first.failed) == {"toy_001"} and "No space left" in first.failed["toy_001"]
    store = OMEZarrStore(url)
    assert "toy_001" not in store.cases() and store.incomplete_cases() == ["toy_001"]

    monkeypatch.setattr(omezarr.OMEZarrStore, "write_case", real_write)
    second = ingest(msd_folder, url, entry=_entry(), progress=False)
    assert second.ok
    assert second.written == ["toy_001"] and sorted(second.skipped) == ["toy_000", "toy_100"]
    assert OMEZarrStore(url).cases() == ["toy_000", "toy_001", "toy_100"]


def test_bad_cases_fail_with_file_and_fix_while_others_land(tmp_path, rng):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    good = rng.normal(size=(16, 16, 8)).astype(np.float32)
    write_nifti_array(root / "images" / "good.nii.gz", good)
    nan_image = good.copy()
    nan_image[3, 4, 5] = np.nan
    nan_image[0, 0, 0] = np.inf
    write_nifti_array(root / "images" / "nan.nii.gz", nan_image)
    write_nifti_array(root / "images" / "offgrid.nii.gz", good)
    write_nifti_array(root / "labels" / "offgrid.nii.gz", np.zeros((16, 16, 8), np.uint8), np.diag([1.0, 1.0, 2.0, 1.0]))
    write_nifti_array(root / "images" / "short.nii.gz", good)
    write_nifti_array(root / "labels" / "short.nii.gz", np.zeros((16, 16, 7), np.uint8))
    report = ingest(root, str(tmp_path / "out.zarr"), progress=False)
    assert report.written == ["good"]
    assert "2 voxels are NaN or Inf" in report.failed["nan"] and "nan.nii.gz" in report.failed["nan"]
    assert "affine differs" in report.failed["offgrid"] and "Fix:" in report.failed["offgrid"]
    assert "shape (Z, Y, X) (7, 16, 16) differs" in report.failed["short"]
    assert OMEZarrStore(str(tmp_path / "out.zarr")).cases() == ["good"]


def test_nnunet_layout_joins_channel_files(tmp_path, rng):
    root = tmp_path / "Dataset001_Toy"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for channel in range(2):
        write_nifti_array(root / "imagesTr" / f"case1_{channel:04d}.nii.gz", np.full((8, 8, 4), channel, np.int16))
    write_nifti_array(root / "labelsTr" / "case1.nii.gz", np.ones((8, 8, 4), np.uint8))
    [case] = discover_cases(root)
    assert case.case_id == "case1" and len(case.images) == 2 and case.label is not None
    report = ingest(root, str(tmp_path / "n.zarr"), modality="CT,PT", progress=False)
    assert report.ok
    image = OMEZarrStore(str(tmp_path / "n.zarr")).read_image("case1")
    assert image.shape == (2, 4, 8, 8) and image.numpy()[1].min() == 1


def test_dicom_series_layout_gives_one_case_per_folder(tmp_path, pydicom_data):
    root = tmp_path / "dicoms"
    for patient in ("p1", "p2"):
        (root / patient / "series").mkdir(parents=True)
        shutil.copy(pydicom_data / "CT_small.dcm", root / patient / "series" / "slice0.dcm")
    cases = discover_cases(root)
    assert [c.case_id for c in cases] == ["p1_series", "p2_series"]
    report = ingest(root, str(tmp_path / "d.zarr"), progress=False)
    assert report.ok
    volume = OMEZarrStore(str(tmp_path / "d.zarr")).read_image("p1_series")
    assert volume.modality == "CT" and volume.is_2d
    assert volume.numpy().min() == -896


def test_distributed_scheduler_address(msd_folder, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        report = ingest(msd_folder, str(tmp_path / "dist.zarr"), entry=_entry(), scheduler_address=cluster.scheduler_address, progress=False)
    assert report.ok and len(report.written) == 3


def test_empty_folder_says_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no cases found"):
        ingest(tmp_path / "empty", str(tmp_path / "x.zarr"), progress=False)
