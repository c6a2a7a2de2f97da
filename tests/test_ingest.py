"""Dask ingest of dataset folders into the store: layouts, checks, resume, fingerprint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spadkit.catalog import DatasetEntry
from spadkit.errors import SpadkitError, StoreError
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
    assert ingest(msd_folder, str(tmp_path / "threads.zarr"), entry=_entry(), progress=False).ok
    on_cluster, on_threads = OMEZarrStore(str(tmp_path / "dist.zarr")), OMEZarrStore(str(tmp_path / "threads.zarr"))
    assert on_cluster.cases() == on_threads.cases()
    for case in on_threads.cases():  # the same voxels, labels, geometry and statistics as with local threads
        np.testing.assert_array_equal(on_cluster.read_image(case).numpy(), on_threads.read_image(case).numpy())
        assert on_cluster.label_names(case) == on_threads.label_names(case)
        for name in on_threads.label_names(case):
            np.testing.assert_array_equal(on_cluster.read_label(case, name).numpy(), on_threads.read_label(case, name).numpy())
        np.testing.assert_array_equal(on_cluster.read_image(case).affine, on_threads.read_image(case).affine)
        assert on_cluster.case_attrs(case)["intensity"] == on_threads.case_attrs(case)["intensity"]
    fingerprints = [{k: v for k, v in store.info["fingerprint"].items() if k != "created"} for store in (on_cluster, on_threads)]  # "created": the write time
    assert fingerprints[0] == fingerprints[1]


def test_empty_folder_says_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no cases found"):
        ingest(tmp_path / "empty", str(tmp_path / "x.zarr"), progress=False)


def test_a_float_label_is_checked_in_every_voxel(tmp_path, rng):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    write_nifti_array(root / "images" / "case.nii.gz", rng.normal(size=(16, 16, 12)).astype(np.float32))
    label = np.zeros((16, 16, 12), np.float32)
    label[2, 3, 0], label[4, 4, 0] = np.nan, 0.5  # slice z=0, far from the middle slice
    write_nifti_array(root / "labels" / "case.nii.gz", label)
    report = ingest(root, str(tmp_path / "out.zarr"), progress=False)
    assert "label map holds 2 non-integer or non-finite voxels" in report.failed["case"]
    assert OMEZarrStore(str(tmp_path / "out.zarr")).cases() == []


def _padded_ct(rng) -> np.ndarray:
    """(x, y, z) CT: air and soft tissue inside a circular field of view, -3024 outside it (as scanners pad)."""
    xx, yy = np.mgrid[:64, :64]
    inside = (xx - 31.5) ** 2 + (yy - 31.5) ** 2 <= 32**2
    body = (xx - 31.5) ** 2 / 20**2 + (yy - 31.5) ** 2 / 14**2 <= 1
    plane = np.where(body, 40, -1000).astype(np.int16)
    ct = np.repeat(plane[..., None], 24, axis=2) + rng.integers(-10, 11, size=(64, 64, 24)).astype(np.int16)
    ct[~inside] = -3024
    return ct


def test_pumit_body_percentiles_map_air_to_zero_on_a_padded_ct(tmp_path, rng):
    (tmp_path / "ds").mkdir()
    ct = _padded_ct(rng)
    write_nifti_array(tmp_path / "ds" / "ct.nii.gz", ct)
    url = str(tmp_path / "ct.zarr")
    assert ingest(tmp_path / "ds", url, modality="CT", progress=False).ok
    [stats] = OMEZarrStore(url).case_attrs("ct")["intensity"]

    def scaled(value: float, entry: dict) -> float:
        return float(np.clip((value - entry["p0.5"]) / (entry["p99.5"] - entry["p0.5"]), 0, 1))

    assert scaled(-1000, stats) > 0.5  # all voxels: the padding is "black", air sits above the middle
    assert scaled(-1000, stats["body"]) == pytest.approx(0.0, abs=0.01)  # PUMIT's foreground: air is 0
    body = ct[ct > ct.min()].astype(np.float64)
    assert stats["body"]["count"] == body.size and stats["body"]["min"] == body.min()
    for p in (0.5, 1, 50, 99, 99.5):
        assert stats["body"][f"p{p:g}"] == pytest.approx(np.percentile(body, p))
        assert stats[f"p{p:g}"] == pytest.approx(np.percentile(ct.astype(np.float64), p))
    assert OMEZarrStore(url).info["fingerprint"]["intensity"]["0:CT"]["median_case_body_p0.5"] == stats["body"]["p0.5"]


def test_assumed_spacing_is_recorded_and_left_out_of_the_fingerprint(tmp_path, rng):
    from PIL import Image

    root = tmp_path / "ds"
    root.mkdir()
    write_nifti_array(root / "ct.nii.gz", rng.normal(size=(32, 32, 10)).astype(np.float32), np.diag([0.5, 0.5, 2.0, 1.0]))
    Image.fromarray(rng.integers(0, 255, size=(40, 40), dtype=np.uint8)).save(root / "xray.png")
    url = str(tmp_path / "mixed.zarr")
    assert ingest(root, url, progress=False).ok
    store = OMEZarrStore(url)
    assert store.case_attrs("xray")["spacing_assumed"] is True and store.case_attrs("ct")["spacing_assumed"] is False
    spacing = store.info["fingerprint"]["spacing_zyx_mm"]
    assert spacing["median"] == [2.0, 0.5, 0.5] and spacing["assumed_cases_left_out"] == 1
    assert store.info["fingerprint"]["cases"]["xray"]["spacing_assumed"] is True


def test_every_file_read_is_recorded_as_the_source(tmp_path, rng):
    import nrrd

    root = tmp_path / "ds"
    root.mkdir()
    nrrd.write(str(root / "scan.nhdr"), rng.normal(size=(12, 10, 8)).astype(np.float32), {"space": "left-posterior-superior"}, detached_header=True)
    assert ingest(root, str(tmp_path / "n.zarr"), progress=False).ok
    files = OMEZarrStore(str(tmp_path / "n.zarr")).case_attrs("scan")["source"]["files"]
    assert [Path(f).name for f in files] == ["scan.nhdr", "scan.raw.gz"]


def test_a_rerun_redoes_a_case_marked_complete_without_its_arrays(msd_folder, tmp_path):
    url = str(tmp_path / "toy.zarr")
    ingest(msd_folder, url, entry=_entry(), progress=False)
    shutil.rmtree(Path(url) / "toy_000" / "0")  # what a concurrent second ingest used to leave behind
    report = ingest(msd_folder, url, entry=_entry(), progress=False)
    assert report.written == ["toy_000"] and "image level 0 is missing" in report.repaired["toy_000"]
    assert OMEZarrStore(url).read_image("toy_000").numpy().shape == (2, 12, 18, 20)


@pytest.mark.parametrize("workers", [0, -1, 2.5])
def test_bad_worker_counts_are_refused(msd_folder, tmp_path, workers):
    with pytest.raises(SpadkitError, match="number of workers must be at least 1"):
        ingest(msd_folder, str(tmp_path / "x.zarr"), num_workers=workers, progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_an_out_that_is_a_file_or_cannot_be_created_is_refused(msd_folder, tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    with pytest.raises(StoreError, match="an existing file, not a store folder") as info:
        ingest(msd_folder, str(existing), progress=False)
    assert info.value.path == str(existing) and existing.read_text() == "keep me"
    with pytest.raises(StoreError, match="cannot create the store here") as info:
        ingest(msd_folder, str(existing / "sub.zarr"), progress=False)
    assert "folder you can write to" in str(info.value)


def test_an_unreachable_scheduler_is_a_clear_error(msd_folder, tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    import spadkit.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "SCHEDULER_TIMEOUT_S", 1.0)
    with pytest.raises(SpadkitError, match="cannot reach the Dask scheduler") as info:
        ingest(msd_folder, str(tmp_path / "x.zarr"), scheduler_address="tcp://127.0.0.1:9", progress=False)
    assert info.value.path == "tcp://127.0.0.1:9" and not (tmp_path / "x.zarr").exists()


def test_ingest_cli_errors_exit_2_without_traceback(msd_folder, tmp_path, capsys):
    from spadkit.cli import main

    (tmp_path / "file.zarr").write_text("")
    for args in (["--workers", "-1"], ["--workers", "0"]):
        assert main(["ingest", str(msd_folder), "--out", str(tmp_path / "a.zarr"), "--quiet", *args]) == 2
        assert "number of workers must be at least 1" in capsys.readouterr().err
    assert main(["ingest", str(msd_folder), "--out", str(tmp_path / "file.zarr"), "--quiet"]) == 2
    assert f"{tmp_path / 'file.zarr'}: --out is an existing file" in capsys.readouterr().err


def test_default_workers_fit_the_available_memory(msd_folder, monkeypatch):
    import spadkit.ingest as ingest_module

    cases = discover_cases(msd_folder)
    case_bytes = 20 * 18 * 12 * 2 * 4 + 20 * 18 * 12  # float32 2-channel image + uint8 label
    monkeypatch.setattr(ingest_module.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(ingest_module, "available_memory", lambda: int(2.5 * ingest_module.CASE_MEMORY_FACTOR * case_bytes))
    assert ingest_module.default_workers(cases) == 2
    monkeypatch.setattr(ingest_module, "available_memory", lambda: 10)
    assert ingest_module.default_workers(cases) == 1
    monkeypatch.setattr(ingest_module, "available_memory", lambda: 1 << 40)
    assert ingest_module.default_workers(cases) == 16


def test_available_memory_is_positive_and_below_the_total():
    from spadkit.ingest import available_memory

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < available_memory() <= total
