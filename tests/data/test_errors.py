"""Bad stores and bad settings: clear errors that name the store, case or chunk, and say what to do."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from spadkit.data import DatasetSource, LabelSampler, PatchStream
from spadkit.errors import CorruptFileError, StoreError
from spadkit.io import OMEZarrStore
from spadkit.volume import Volume
from tests.data.conftest import StoreFixture, encoded, make_stream, sphere, write


@pytest.fixture(params=[False, True], ids=["chunked", "sharded"])
def one_case(request, tmp_path) -> StoreFixture:
    """A fresh store with one 20x24x22 case ``c0`` (one chunk, or one shard) and its label."""
    url = str(tmp_path / "one.zarr")
    fx = StoreFixture(url)
    write(OMEZarrStore(url, mode="a", sharded=request.param), fx, "c0", encoded((20, 24, 22)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), sphere((20, 24, 22), (10, 12, 11), 4))
    return fx


def _chunk_file(url: str, array: str) -> Path:
    files = [p for p in (Path(url) / array / "c").rglob("*") if p.is_file()]
    assert len(files) == 1
    return files[0]


def test_a_store_without_complete_cases_names_the_store(tmp_path):
    url = str(tmp_path / "empty.zarr")
    store = OMEZarrStore(url, mode="a")
    with pytest.raises(StoreError, match="no complete cases") as info:
        PatchStream([url])
    assert info.value.path == url and "spadkit ingest" in str(info.value)
    store.root.create_group("interrupted")  # a case whose write never finished
    with pytest.raises(StoreError, match="no complete cases"):
        PatchStream([url])


def test_a_missing_store_raises(tmp_path):
    with pytest.raises(StoreError, match="no OME-Zarr store here"):
        PatchStream([str(tmp_path / "nothing.zarr")])


def test_requested_cases_must_be_in_the_store(uniform_store):
    with pytest.raises(StoreError, match=r"2 requested case\(s\) are not complete in this store: u9, zz") as info:
        PatchStream([DatasetSource(uniform_store.url, cases=["u0", "zz", "u9"])])
    assert info.value.path == uniform_store.url


def test_a_missing_label_or_level_names_the_case(uniform_store):
    with pytest.raises(StoreError, match="case u0 has no label 'organs'"):
        PatchStream([DatasetSource(uniform_store.url, label="organs")])
    with pytest.raises(StoreError, match="case u0 has no pyramid level 3"):
        PatchStream([DatasetSource(uniform_store.url, level=3)])


def test_label_sampler_needs_a_label(uniform_store):
    with pytest.raises(ValueError, match="LabelSampler needs label="):
        PatchStream([uniform_store.url], sampler=LabelSampler(0.5))


def test_weights_summing_to_zero_raise(uniform_store):
    sources = [DatasetSource(uniform_store.url, weight=0.0), DatasetSource(uniform_store.url, name="again", weight=0.0)]
    with pytest.raises(ValueError, match="zero share"):
        PatchStream(sources)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"samples_per_case": 1.5}, "samples_per_case"),
        ({"interleave": -1}, "interleave"),
        ({"intensity": "minmax"}, "intensity"),
        ({"mixing": "loud"}, "mixing"),
    ],
)
def test_bad_stream_settings_raise(uniform_store, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PatchStream([uniform_store.url], **kwargs)


def test_a_stream_needs_a_source():
    with pytest.raises(ValueError, match="at least one source"):
        PatchStream([])


def test_a_deleted_chunk_file_names_the_chunk(one_case):
    chunk = _chunk_file(one_case.url, "c0/0")
    chunk.unlink()
    stream = make_stream(one_case, patch_size=8)
    key = chunk.relative_to(Path(one_case.url) / "c0" / "0").as_posix()
    with pytest.raises(StoreError, match=f"chunk file {key} is missing") as info:
        next(iter(stream))
    assert "c0/0" in info.value.path and "re-ingest" in str(info.value)


def test_a_deleted_label_chunk_is_found_too(one_case):
    _chunk_file(one_case.url, "c0/labels/seg/v0001/0").unlink()
    stream = make_stream(one_case, sources=[DatasetSource(one_case.url, label="seg")], patch_size=8, num_threads=2)
    with pytest.raises(StoreError, match="is missing") as info:
        next(iter(stream))
    assert "labels/seg/v0001/0" in info.value.path


def test_stores_that_skipped_empty_chunks_read_missing_chunks_as_zeros(one_case):
    """Before ``all_chunks_written``, ingest skipped all-zero chunks: a missing chunk is background."""
    store = OMEZarrStore(one_case.url, mode="a")
    attrs = store.case_attrs("c0")
    del attrs["all_chunks_written"]
    store.root["c0"].attrs["spadkit"] = attrs
    _chunk_file(one_case.url, "c0/labels/seg/v0001/0").unlink()
    batch = next(iter(make_stream(one_case, sources=[DatasetSource(one_case.url, label="seg")], patch_size=8)))
    assert not batch["label"].any()
    assert batch["image"].any()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_chunk_file_raises_corrupt_file_error(one_case, damage):
    chunk = _chunk_file(one_case.url, "c0/0")
    data = chunk.read_bytes()
    if damage == "truncate":
        chunk.write_bytes(data[: len(data) // 3])
    else:
        chunk.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    stream = make_stream(one_case, patch_size=8, num_threads=2)
    with pytest.raises(CorruptFileError, match="cannot decode chunks|is truncated or damaged") as info:  # the store checks Blosc frames
        next(iter(stream))
    assert "c0/0" in info.value.path and "re-ingest" in str(info.value)


def test_a_deleted_array_names_the_case(one_case):
    shutil.rmtree(Path(one_case.url) / "c0" / "0")
    with pytest.raises(StoreError, match=r"case c0 .*marked complete but its (image )?level 0 (array )?is missing") as info:
        PatchStream([one_case.url])
    assert info.value.path.startswith(one_case.url)


def test_percentile_scaling_needs_the_ingest_statistics(tmp_path):
    url = str(tmp_path / "bare.zarr")
    OMEZarrStore(url, mode="a").write_case("bare", Volume.from_spacing(encoded((10, 12, 14))))
    with pytest.raises(StoreError, match=r"lacks the intensity statistics \('p0.5', 'p99.5'\)"):
        next(iter(PatchStream([url], patch_size=8, num_threads=0)))
    batch = next(iter(PatchStream([url], patch_size=8, num_threads=0, intensity="none")))
    assert batch["image"].shape == (2, 1, 8, 8, 8)
