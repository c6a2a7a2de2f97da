"""Damaged stores: lost or broken chunks raise on every read path, damage stays with its case,
`spadkit check` names every problem and `spadkit ingest --repair` redoes the damaged cases."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spadkit.check import check_store
from spadkit.cli import main
from spadkit.errors import CorruptFileError, StoreError
from spadkit.ingest import ingest
from spadkit.io import OMEZarrStore
from spadkit.io.omezarr import StoreDamageWarning
from tests.conftest import write_nifti_array

SHAPE_XYZ = (80, 72, 20)  # nibabel order; stored (Z, Y, X) = (20, 72, 80): 4 chunks at level 0, 1 at level 1


@pytest.fixture
def dataset(tmp_path, rng) -> Path:
    """A flat dataset of three labelled cases."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in ("a", "b", "c"):
        image = rng.normal(100, 20, size=SHAPE_XYZ).astype(np.float32)
        write_nifti_array(root / "images" / f"{name}.nii.gz", image)
        write_nifti_array(root / "labels" / f"{name}.nii.gz", (image > 110).astype(np.uint8))
    return root


@pytest.fixture
def store_url(dataset, tmp_path) -> str:
    url = str(tmp_path / "s.zarr")
    assert ingest(dataset, url, progress=False).ok
    return url


def _chunk(url: str, array: str) -> Path:
    """The first chunk file (c/0/0/0/0) of an array."""
    return Path(url) / array / "c" / "0" / "0" / "0" / "0"


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_deleted_chunk_raises_in_read_image_read_label_and_info(store_url, capsys):
    image_chunk, label_chunk = _chunk(store_url, "a/0"), _chunk(store_url, "a/labels/seg/v0001/0")
    image_chunk.unlink()
    label_chunk.unlink()
    store = OMEZarrStore(store_url)
    with pytest.raises(StoreError, match="chunk file c/0/0/0/0 is missing") as info:
        store.read_image("a").numpy()
    assert info.value.path == f"{store_url}/a/0" and "--repair" in str(info.value)
    with pytest.raises(StoreError, match="is missing") as info:
        store.read_label("a").numpy()
    assert info.value.path == f"{store_url}/a/labels/seg/v0001/0"
    np.testing.assert_array_equal(store.read_image("b").numpy().shape, (1, 20, 72, 80))  # other cases are fine
    code, _, err = _cli(capsys, "info", f"{store_url}/a")
    assert code == 2 and "chunk file c/0/0/0/0 is missing" in err


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_chunk_gives_a_clear_error_in_info(store_url, damage, capsys):
    chunk = _chunk(store_url, "a/0")
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 3] if damage == "truncate" else bytes(np.random.default_rng(1).integers(0, 256, len(data), dtype=np.uint8)))
    with pytest.raises(CorruptFileError, match="chunk file c/0/0/0/0 is truncated or damaged"):
        OMEZarrStore(store_url).read_image("a").numpy()
    if damage == "truncate":  # a real process: the Blosc decoder crashed on this, and asyncio printed noise at exit
        result = subprocess.run([sys.executable, "-m", "spadkit.cli", "info", f"{store_url}/a"], capture_output=True, text=True, timeout=120)
        code, err = result.returncode, result.stderr
        assert "Traceback" not in err and "Event loop is closed" not in err
    else:
        code, _, err = _cli(capsys, "info", f"{store_url}/a")
    assert code == 2, err
    assert "chunk file c/0/0/0/0 is truncated or damaged" in err and f"{store_url}/a/0" in err


def test_stores_written_before_all_chunks_written_read_missing_chunks_as_background(store_url):
    store = OMEZarrStore(store_url, mode="a")
    attrs = store.case_attrs("a")
    del attrs["all_chunks_written"]
    store.root["a"].attrs["spadkit"] = attrs
    _chunk(store_url, "a/labels/seg/v0001/0").unlink()
    label = OMEZarrStore(store_url).read_label("a").numpy()
    assert not label[0, :, :64, :64].any() and label[0, :, 64:].any()  # chunk (0, 0, 0, 0) covers 20x64x64 voxels


def test_a_corrupt_or_deleted_case_zarr_json_is_isolated_and_named(store_url, capsys):
    (Path(store_url) / "b" / "zarr.json").write_text("{not json")
    (Path(store_url) / "c" / "zarr.json").unlink()
    store = OMEZarrStore(store_url)
    with pytest.warns(StoreDamageWarning, match=r"2 damaged case\(s\) left out \(b: its zarr.json is not valid JSON.*c: its zarr.json is missing"):
        assert store.cases() == ["a"]
    assert set(store.damaged_cases()) == {"b", "c"}
    with pytest.raises(StoreError, match="case b is damaged: its zarr.json is not valid JSON"):
        store.read_image("b")
    np.testing.assert_array_equal(store.read_image("a").numpy().shape, (1, 20, 72, 80))
    with pytest.warns(StoreDamageWarning):
        code, out, _ = _cli(capsys, "info", store_url)
    assert code == 0 and "DAMAGED      b: its zarr.json is not valid JSON" in out
    assert "DAMAGED      c: its zarr.json is missing" in out


def test_the_patch_stream_skips_damaged_cases_with_a_warning(store_url):
    from spadkit.data import PatchStream

    (Path(store_url) / "b" / "zarr.json").write_text("{not json")
    with pytest.warns(StoreDamageWarning, match="b: its zarr.json is not valid JSON"):
        stream = PatchStream([store_url], patch_size=8, batch_size=2, seed=0)
    batch = next(iter(stream))
    assert batch["image"].shape[0] == 2


def test_a_corrupt_root_zarr_json_names_the_file_and_the_fix_works(store_url, dataset, capsys):
    root_json = Path(store_url) / "zarr.json"
    root_json.write_text('{"zarr_format": 3, "node_type": "gro')
    with pytest.raises(StoreError, match="the store's root metadata cannot be read") as info:
        OMEZarrStore(store_url)
    assert info.value.path == str(root_json) and "move it away" in info.value.fix
    code, _, err = _cli(capsys, "info", store_url)
    assert code == 2 and str(root_json) in err
    root_json.rename(root_json.with_suffix(".bad"))  # the fix the message gives
    report = ingest(dataset, store_url, progress=False)
    assert report.ok and sorted(report.skipped) == ["a", "b", "c"]  # complete cases kept
    assert OMEZarrStore(store_url).info["fingerprint"]["num_cases"] == 3


def test_check_names_every_problem_and_repair_redoes_the_damaged_cases(store_url, dataset, capsys):
    good = OMEZarrStore(store_url).read_image("a").numpy()
    _chunk(store_url, "a/1").unlink()  # a lost chunk of a coarse level
    shutil.rmtree(Path(store_url) / "b" / "0")  # the full-resolution array is gone
    (Path(store_url) / "c" / "zarr.json").write_text("[]")
    OMEZarrStore(store_url, mode="a").root.create_group("interrupted")
    report = check_store(store_url)
    assert not report.ok
    assert report.good == [] and report.incomplete == ["interrupted"]
    assert "chunk file c/0/0/0/0 is missing" in report.problems["a"] and "a/1" in report.problems["a"]
    assert "image level 0 is missing" in report.problems["b"]
    assert "does not describe a Zarr group" in report.problems["c"]
    code, out, _ = _cli(capsys, "check", store_url, "--json")
    assert code == 1 and set(json.loads(out)["damaged"]) == {"a", "b", "c"}
    assert set(check_store(store_url, deep=False).problems) == {"b", "c"}  # --quick does not read chunks

    plain = ingest(dataset, store_url, progress=False)  # a plain re-run redoes what it can see without reading chunks
    assert sorted(plain.written) == ["b", "c"] and plain.skipped == ["a"]
    repaired = ingest(dataset, store_url, repair=True, progress=False)
    assert repaired.ok and repaired.written == ["a"] and "is missing" in repaired.repaired["a"]
    assert "REDONE a" in repaired.summary()
    assert check_store(store_url).ok and _cli(capsys, "check", store_url)[0] == 0
    np.testing.assert_array_equal(OMEZarrStore(store_url).read_image("a").numpy(), good)


def test_damage_without_a_source_is_reported_not_deleted(store_url, tmp_path, rng):
    other = tmp_path / "other"
    other.mkdir()
    write_nifti_array(other / "z.nii.gz", rng.normal(size=(8, 8, 8)).astype(np.float32))
    shutil.rmtree(Path(store_url) / "a" / "0")
    report = ingest(other, store_url, progress=False)
    assert not report.ok and "image level 0 is missing" in report.unrepairable["a"]
    assert (Path(store_url) / "a").is_dir() and "DAMAGED a" in report.summary()


def test_an_fsspec_store_reports_lost_chunks_and_damage_too():
    """Remote stores go through the same checked store (here fsspec's in-memory file system); they take no locks."""
    import fsspec

    from spadkit.volume import LabelVolume, Volume

    url = "memory://spadkit-damage-test.zarr"
    store = OMEZarrStore(url, mode="a")
    image = Volume.from_spacing(np.arange(20 * 70 * 70, dtype=np.int16).reshape(20, 70, 70))
    store.write_case("a", image, LabelVolume((image.numpy() > 5000).astype(np.uint8), image.affine))
    assert store.save_label("a", LabelVolume(np.zeros(image.shape, np.uint8), image.affine)) == 2
    fs = fsspec.filesystem("memory")
    try:
        fs.rm("/spadkit-damage-test.zarr/a/0/c/0/0/0/0")
        with pytest.raises(StoreError, match="chunk file c/0/0/0/0 is missing") as info:
            OMEZarrStore(url).read_image("a").numpy()
        assert info.value.path == f"{url}/a/0"
        assert "chunk file c/0/0/0/0 is missing" in check_store(url).problems["a"]
    finally:
        fs.rm("/spadkit-damage-test.zarr", recursive=True)


def test_check_reads_the_annotated_masks_of_label_versions(store_url):
    store = OMEZarrStore(store_url, mode="a")
    label = store.read_label("a")
    annotated = np.zeros(label.spatial_shape, np.uint8)
    annotated[5] = 1
    version = store.save_label("a", label, annotated=annotated)
    assert check_store(store_url).ok
    mask_folder = Path(store_url) / "a" / "labels" / "seg" / f"v{version:04d}" / "annotated" / "c"
    next(p for p in mask_folder.rglob("*") if p.is_file()).unlink()
    report = check_store(store_url)
    assert "v0002/annotated" in report.problems["a"] and "is missing" in report.problems["a"], report.problems
