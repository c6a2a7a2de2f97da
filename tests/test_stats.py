"""Chunk-wise statistics read a volume slab by slab, never whole."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from spadkit import stats


class _Recording:
    """A Zarr array that records the Z extent of every read."""

    def __init__(self, array: zarr.Array):
        self.array, self.shape, self.dtype, self.chunks, self.ndim = array, array.shape, array.dtype, array.chunks, array.ndim
        self.depths: list[int] = []

    def __getitem__(self, index):
        z = index[1] if isinstance(index, tuple) and len(index) > 1 else slice(None)
        self.depths.append(len(range(*z.indices(self.shape[1]))))
        return self.array[index]


def test_value_range_reads_one_chunk_row_at_a_time_and_counts_nonfinite(monkeypatch, rng):
    monkeypatch.setattr(stats, "SLAB_VOXELS", 1)  # the smallest slab: one chunk row
    data = rng.normal(size=(2, 45, 30, 20)).astype(np.float32)
    data[1, 44, 0, 0], data[0, 3, 2, 1] = np.nan, np.inf
    array = zarr.create_array(store={}, shape=data.shape, chunks=(1, 8, 30, 20), dtype=data.dtype)
    array[...] = data
    recording = _Recording(array)
    lo, hi, bad = stats.value_range(recording)
    finite = data[np.isfinite(data)]
    assert (lo, hi, bad) == (float(finite.min()), float(finite.max()), 2)
    assert max(recording.depths) == 8 and len(recording.depths) == 2 * 6  # 6 chunk rows per channel


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_chunk_wise_statistics_equal_numpy_on_volumes_larger_than_a_slab(monkeypatch, rng, dtype):
    monkeypatch.setattr(stats, "SLAB_VOXELS", 1000)  # many slabs
    monkeypatch.setattr(stats, "MAX_HISTOGRAM_BINS", 1 << 22 if dtype is np.int32 else 1)
    data = (rng.normal(0, 300, size=(2, 30, 17, 23)) + rng.integers(0, 2, size=(2, 30, 17, 23)) * -2000).astype(dtype)
    data[0, :3] = data[0].min()
    label = (rng.random((1, 30, 17, 23)) > 0.7).astype(np.uint8)
    for channel, entry in enumerate(stats.intensity_stats(data, label)):
        values = data[channel].astype(np.float64)
        for key, subset in (("all", values.ravel()), ("body", values[values > values.min()]), ("foreground", values[label[0] > 0])):
            got = entry if key == "all" else entry[key]
            assert got["count"] == subset.size
            assert got["mean"] == pytest.approx(subset.mean()) and got["std"] == pytest.approx(subset.std())
            assert [got[f"p{p:g}"] for p in stats.PERCENTILES] == pytest.approx(np.percentile(subset, stats.PERCENTILES).tolist())
