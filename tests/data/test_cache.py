"""The decoded-chunk cache: LRU bound in bytes, and patches that read only the chunks they overlap."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import zarr

from spadkit.data import ChunkCache, DatasetSource
from spadkit.data.cache import CachedArray
from spadkit.data.chunkfile import LocalChunkReader
from spadkit.errors import CorruptFileError, StoreError
from spadkit.io import OMEZarrStore
from tests.data.conftest import StoreFixture, encoded, expected_window, make_stream, write


def _chunk(nbytes: int) -> np.ndarray:
    return np.zeros(nbytes, dtype=np.uint8)


def test_lru_keeps_the_byte_bound_and_evicts_the_oldest():
    cache = ChunkCache(max_bytes=250)
    cache.put(("a", (0,)), _chunk(100))
    cache.put(("a", (1,)), _chunk(100))
    assert cache.get(("a", (0,))) is not None  # (0,) becomes the most recent
    cache.put(("a", (2,)), _chunk(100))
    assert cache.nbytes == 200 and len(cache) == 2
    assert cache.get(("a", (1,))) is None  # the least recently used went
    assert cache.get(("a", (0,))) is not None and cache.get(("a", (2,))) is not None
    cache.put(("a", (2,)), _chunk(50))  # replacing a key frees its old bytes
    assert cache.nbytes == 150
    cache.put(("b", (0,)), _chunk(300))  # larger than the whole cache: not kept
    assert cache.get(("b", (0,))) is None and cache.nbytes == 150
    assert cache.hits == 3 and cache.misses == 2
    cache.clear()
    assert cache.nbytes == 0 and len(cache) == 0


def test_zero_bytes_disables_caching_and_negative_raises():
    cache = ChunkCache(0)
    cache.put(("a", (0,)), _chunk(1))
    assert len(cache) == 0
    with pytest.raises(ValueError, match=">= 0"):
        ChunkCache(-1)


def test_cached_array_reads_any_box_exactly(tmp_path, rng):
    data = rng.integers(0, 1 << 30, size=(2, 37, 29, 41), dtype=np.int64)
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=data.shape, chunks=(1, 8, 16, 7), dtype="int64")
    array[...] = data
    cached = CachedArray(array, ChunkCache(1 << 20))
    _reads_random_boxes_exactly(cached, data, rng, 40)
    assert cached.cache.hits > 0


def _reads_random_boxes_exactly(cached: CachedArray, data: np.ndarray, rng, count: int) -> None:
    for _ in range(count):
        lo = [int(rng.integers(0, n)) for n in data.shape]
        hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, data.shape)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        out = np.empty([b - a for a, b in zip(lo, hi)], dtype=np.float64)
        cached.read(box, out)
        np.testing.assert_array_equal(out, data[box])


def _overlapped_chunks(start, size, shape, chunks):
    """Chunk indices ``(c, z, y, x)`` that the clamped window touches."""
    ranges = [range(1)]
    for s, n, length, c in zip(start, size, shape, chunks):
        lo, hi = max(s, 0), min(s + n, length)
        ranges.append(range(lo // c, (hi - 1) // c + 1))
    return set(itertools.product(*ranges))


def test_one_batch_reads_only_the_chunks_its_windows_overlap(mixed_store):
    """The 72x140x130 case is 2x3x3 chunks of 64^3; two 20^3 windows need a few of them."""
    sources = [DatasetSource(mixed_store.url, cases=["big"], label="seg")]
    stream = make_stream(mixed_store, sources=sources, patch_size=20, seed=0)
    batch = next(iter(stream))
    shape, chunks = (72, 140, 130), (64, 64, 64)
    expected = set()
    for start in batch["start"].tolist():
        expected |= _overlapped_chunks(start, (20, 20, 20), shape, chunks)
    keys = list(stream.cache._chunks)
    names = {name for name, _ in keys}
    assert len(names) == 2  # the image and its label
    for name in names:
        assert {idx for n, idx in keys if n == name} == expected
    assert len(expected) < 2 * 3 * 3  # not the whole volume
    chunk_bytes = {idx: np.prod([min(c, n - i * c) for i, c, n in zip(idx[1:], chunks, shape)]) * 4 for idx in expected}
    assert stream.cache.nbytes == 2 * sum(chunk_bytes.values())  # int32 image and label


def test_a_small_cache_stays_bounded_and_reads_stay_correct(mixed_store):
    bound = 1_200_000  # about one 64^3 int32 chunk
    sources = [DatasetSource(mixed_store.url, cases=["big"], label="seg")]
    stream = make_stream(mixed_store, sources=sources, patch_size=40, samples_per_case=6, cache_bytes=bound, num_threads=2)
    case = mixed_store.cases["big"]
    count = 0
    for batch in stream:
        assert stream.cache.nbytes <= bound
        for i, start in enumerate(batch["start"].tolist()):
            np.testing.assert_array_equal(batch["image"][i].numpy(), expected_window(case.image, start, (40, 40, 40), [0]))
            np.testing.assert_array_equal(batch["label"][i].numpy(), expected_window(case.label, start, (40, 40, 40), [0]))
        count += 1
    assert count == 6 and stream.cache.misses > 0



def test_stores_with_the_same_case_ids_never_share_chunks(uniform_store, tmp_path):
    url = str(tmp_path / "twin.zarr")
    twin = StoreFixture(url)
    write(OMEZarrStore(url, mode="a"), twin, "u0", encoded((16, 20, 18), 5_000_000), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    sources = [DatasetSource(uniform_store.url, cases=["u0"]), DatasetSource(url, name="twin")]
    stream = make_stream(uniform_store, sources=sources, batch_size=1, samples_per_case=4, mixing="uniform", num_threads=2)
    names = []
    for batch in stream:
        case = (twin if batch["dataset"][0] == "twin" else uniform_store).cases["u0"]
        start = batch["start"][0].tolist()
        np.testing.assert_array_equal(batch["image"][0].numpy(), expected_window(case.image, start, (8, 8, 8), [case.image.min()]))
        names.append(batch["dataset"][0])
    assert sorted(set(names)) == ["twin", "uniform"]
    assert len({name for name, _ in stream.cache._chunks}) == 2


def test_label_locations_survive_a_closed_reader(mixed_store):
    """More cases than open readers: a case's foreground locations are found once, not per visit."""
    from spadkit.data.cache import ChunkCache
    from spadkit.data.reader import ReaderPool
    from spadkit.data.sources import DatasetSource, index_source

    cases = index_source(DatasetSource(mixed_store.url, label="seg"))
    pool = ReaderPool(ChunkCache(0), "none", max_open=1)
    first = pool.get(cases[0]).class_locations()
    pool.get(cases[1])  # closes the first reader
    reopened = pool.get(cases[0])
    assert reopened.label_index().classes is first  # restored, no rescan


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32"])
@pytest.mark.parametrize("cache_bytes", [1 << 20, 0])
def test_the_local_chunk_reader_reads_what_zarr_reads(tmp_path, rng, dtype, cache_bytes):
    """Whole chunks decoded with numcodecs, edge chunks included, equal Zarr's own reads."""
    data = (rng.random((2, 37, 29, 41)) * 200).astype(dtype)
    url = str(tmp_path / "a.zarr")
    array = zarr.create_array(url, shape=data.shape, chunks=(1, 8, 16, 7), dtype=dtype, compressors=zarr.codecs.BloscCodec(cname="lz4"))
    array[...] = data
    reader = LocalChunkReader.open(array, url, strict=True)
    assert reader is not None
    _reads_random_boxes_exactly(CachedArray(array, ChunkCache(cache_bytes), chunk_reader=reader), data, rng, 30)


def test_the_local_chunk_reader_leaves_other_layouts_to_zarr(tmp_path):
    sharded = zarr.create_array(str(tmp_path / "s.zarr"), shape=(8, 8), chunks=(2, 2), shards=(4, 4), dtype="int16")
    plain = zarr.create_array(str(tmp_path / "p.zarr"), shape=(8, 8), chunks=(2, 2), dtype="int16", compressors=zarr.codecs.ZstdCodec())
    assert LocalChunkReader.open(sharded, str(tmp_path / "s.zarr"), strict=True) is None  # sharded
    assert LocalChunkReader.open(plain, str(tmp_path / "p.zarr"), strict=True) is None  # zstd, not blosc
    blosc = zarr.create_array(str(tmp_path / "b.zarr"), shape=(8, 8), chunks=(2, 2), dtype="int16", compressors=zarr.codecs.BloscCodec())
    assert LocalChunkReader.open(blosc, str(tmp_path / "b.zarr"), strict=True) is not None
    assert LocalChunkReader.open(blosc, "s3://bucket", strict=True) is None  # not a local store


def test_the_local_chunk_reader_reports_damage_like_the_store(tmp_path):
    url = str(tmp_path / "a.zarr")
    array = zarr.create_array(url, shape=(32, 32), chunks=(16, 16), dtype="int16", compressors=zarr.codecs.BloscCodec(cname="lz4"))
    array[...] = np.arange(32 * 32, dtype=np.int16).reshape(32, 32) + 1
    strict = LocalChunkReader.open(array, url, strict=True)
    loose = LocalChunkReader.open(array, url, strict=False)
    chunk = tmp_path / "a.zarr" / "c" / "1" / "0"
    raw = chunk.read_bytes()
    chunk.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError, match="c/1/0 is truncated"):
        strict.read((1, 0))
    chunk.write_bytes(b"\x07" * len(raw))
    with pytest.raises(CorruptFileError, match="cannot decode"):
        strict.read((1, 0))
    chunk.unlink()
    with pytest.raises(StoreError, match="chunk file c/1/0 is missing"):
        strict.read((1, 0))
    assert np.all(loose.read((1, 0)) == 0)  # a store that skipped empty chunks: the fill value
