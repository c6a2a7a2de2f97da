"""PatchStream: patch content, geometry, sharding, mixing and equal output from threads and workers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from spadkit.data import (
    ChunkCache,
    DatasetSource,
    LabelSampler,
    PatchSize,
    PatchStream,
    index_source,
)
from spadkit.data import reader as reader_module
from spadkit.data.geometry import patch_affine
from spadkit.data.reader import CaseReader
from spadkit.ingest import intensity_stats
from spadkit.io import OMEZarrStore, read_volume
from spadkit.volume import Volume
from tests.data.conftest import (
    StoreFixture,
    assert_batches_equal,
    encoded,
    expected_window,
    make_stream,
    write,
)


def _epoch(stream) -> list[dict]:
    return list(stream)


def _min_per_channel(image: np.ndarray) -> np.ndarray:
    return image.reshape(image.shape[0], -1).min(axis=1)


def _check_batch(batch, fixture, patch_shape=None) -> None:
    """Every patch of ``batch`` is the window at its start (raw intensities), with matching geometry."""
    b = len(batch["case_id"])
    assert batch["image"].dtype == torch.float32 and batch["image"].shape[0] == b
    for i, case_id in enumerate(batch["case_id"]):
        case = fixture.cases[case_id]
        start = batch["start"][i].tolist()
        size = batch["image"].shape[2:]
        if patch_shape is not None:
            assert tuple(size) == patch_shape[case_id]
        want = expected_window(case.image, start, size, _min_per_channel(case.image))
        np.testing.assert_array_equal(batch["image"][i].numpy(), want)
        if "label" in batch:
            np.testing.assert_array_equal(batch["label"][i].numpy(), expected_window(case.label, start, size, [0]))
        np.testing.assert_allclose(batch["spacing"][i].numpy(), case.spacing)
        # the patch's affine maps its voxel (0, 0, 0) to the case's voxel `start`
        corner = case.affine @ np.array([start[2], start[1], start[0], 1.0])
        np.testing.assert_allclose(batch["origin"][i].numpy(), corner[:3])
        np.testing.assert_allclose(batch["affine"][i, :3, :3].numpy(), case.affine[:3, 2::-1])  # columns in array order
        np.testing.assert_allclose(batch["affine"][i].numpy() @ [1, 2, 3, 1], case.affine @ [start[2] + 3, start[1] + 2, start[0] + 1, 1])


def test_patches_equal_the_window_they_claim(mixed_store):
    stream = make_stream(mixed_store, sources=[DatasetSource(mixed_store.url, label="seg")], patch_size=16)
    expected = {
        "iso_a": (16, 16, 16),
        "iso_b": (16, 16, 16),
        "big": (16, 16, 16),
        "two_ch": (16, 16, 16),
        "aniso": (5, 16, 16),  # 16 mm at 3 mm per slice
        "flat": (1, 16, 16),  # 2D: one slice, the voxel count holds in-plane
    }
    assert {c.case_id: s for c, s in zip(stream.cases[0], stream.patch_shapes[0])} == expected
    batches = _epoch(stream)
    assert len(batches) == len(stream) > 0
    seen = set()
    for batch in batches:
        _check_batch(batch, mixed_store, expected)
        assert batch["label"].dtype == torch.int64
        assert batch["image"].shape[1] == (2 if batch["case_id"][0] == "two_ch" else 1)
        assert batch["dataset"] == ["mixed"] * 2
        seen.update(batch["case_id"])
    assert seen == set(mixed_store.cases)


def test_2d_patches_have_one_slice_and_xr_modality(mixed_store):
    stream = make_stream(mixed_store, sources=[DatasetSource(mixed_store.url, cases=["flat"])], patch_size=(12, 20, 24))
    batch = next(iter(stream))
    assert batch["image"].shape == (2, 1, 1, 20, 24)  # the 12-slice request becomes one slice
    assert batch["start"][:, 0].tolist() == [0, 0]
    assert batch["modality"] == ["XR", "XR"]
    _check_batch(batch, mixed_store)


def test_labels_line_up_with_the_image(mixed_store):
    """Label voxels are exactly where the written ball is, recomputed from the image's position code."""
    stream = make_stream(mixed_store, sources=[DatasetSource(mixed_store.url, cases=["iso_a"], label="seg")], patch_size=24, sampler=LabelSampler(1.0), samples_per_case=4)
    for batch in stream:
        image, label = batch["image"][:, 0].numpy(), batch["label"][:, 0].numpy()
        code = image.astype(np.int64) - 100_000
        z, y, x = code // 10000, code // 100 % 100, code % 100
        inside = (z - 20) ** 2 + (y - 24) ** 2 + (x - 22) ** 2 <= 36
        np.testing.assert_array_equal(label == 1, inside)
        assert label.any(axis=(1, 2, 3)).all()


def test_a_case_smaller_than_the_patch_is_padded(mixed_store):
    sources = [DatasetSource(mixed_store.url, cases=["aniso", "iso_a", "two_ch"], label="seg")]
    stream = make_stream(mixed_store, sources=sources, patch_size=64, samples_per_case=3)
    expected = {"aniso": (21, 64, 64), "iso_a": (64, 64, 64), "two_ch": (64, 64, 64)}  # 64 mm / 3 mm = 21.3
    batches = list(stream)
    assert {c for b in batches for c in b["case_id"]} == set(expected)
    for batch in batches:
        _check_batch(batch, mixed_store, expected)
        case = mixed_store.cases[batch["case_id"][0]]
        for i in range(len(batch["case_id"])):
            start = batch["start"][i].tolist()
            # every axis is shorter than the patch: the whole volume lies inside the window
            for s, n, p in zip(start, case.image.shape[1:], batch["image"].shape[2:]):
                assert n < p and s <= 0 and s + p >= n
            assert (batch["label"][i] > 0).any()


def test_padding_takes_each_channels_minimum(mixed_store):
    stream = make_stream(mixed_store, sources=[DatasetSource(mixed_store.url, cases=["two_ch"])], patch_size=32)
    batch = next(iter(stream))
    image = batch["image"][0].numpy()
    start = batch["start"][0].tolist()
    assert start[0] < 0  # 20 slices in a 32-slice patch
    low = mixed_store.cases["two_ch"].image.reshape(2, -1).min(axis=1)
    assert low[0] != low[1]
    for c in range(2):
        assert np.all(image[c, : -start[0]] == low[c])


def test_percentile_intensities_lie_in_unit_range_and_zscore_matches_the_stats(mixed_store):
    sources = [DatasetSource(mixed_store.url, cases=["iso_b", "big", "two_ch"])]
    raw = _epoch(make_stream(mixed_store, sources=sources, patch_size=40))
    scaled = _epoch(make_stream(mixed_store, sources=sources, patch_size=40, intensity="percentile"))
    zscored = _epoch(make_stream(mixed_store, sources=sources, patch_size=40, intensity="zscore"))
    store = OMEZarrStore(mixed_store.url)
    for r, p, z in zip(raw, scaled, zscored):
        assert torch.equal(r["start"], p["start"]) and r["case_id"] == p["case_id"]
        assert p["image"].min() >= 0.0 and p["image"].max() <= 1.0
        assert p["image"].max() > p["image"].min()
        for i, case_id in enumerate(r["case_id"]):
            stats = store.case_attrs(case_id)["intensity"]
            for c, s in enumerate(stats):
                x = r["image"][i, c].double()
                want = ((x - s["p0.5"]) / (s["p99.5"] - s["p0.5"])).clamp(0, 1)
                torch.testing.assert_close(p["image"][i, c].double(), want, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(z["image"][i, c].double(), (x - s["mean"]) / s["std"], atol=1e-4, rtol=1e-5)


def test_spacing_and_batch_keys_never_mix_shapes(mixed_store):
    stream = make_stream(mixed_store, patch_size=12, batch_size=3, samples_per_case=1, visits_per_epoch=30)
    spacing_of = {cid: c.spacing for cid, c in mixed_store.cases.items()}
    for batch in stream:
        assert len({spacing_of[c] for c in batch["case_id"]} | {tuple(batch["spacing"][0].tolist())}) == 1
        assert [tuple(s) for s in batch["spacing"].tolist()] == [spacing_of[c] for c in batch["case_id"]]


# ---------------------------------------------------------------------------------- sharding
def _group_cases(batches) -> list[set]:
    return [set(b["case_id"]) for b in batches]


def test_two_ranks_see_disjoint_cases_and_the_same_number_of_batches(uniform_store):
    ranks = [make_stream(uniform_store, rank=r, world_size=2) for r in range(2)]
    batches = [_epoch(s) for s in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0]) == 4  # 8 cases / 2 per batch / 2 ranks * 2 samples
    cases = [set().union(*_group_cases(b)) for b in batches]
    assert cases[0].isdisjoint(cases[1])
    assert cases[0] | cases[1] == set(uniform_store.cases)
    single = _epoch(make_stream(uniform_store))
    assert len(single) == 8
    # the ranks' windows are the single process's windows: sharding changes who reads, not what
    windows = {(b["case_id"][i], tuple(b["start"][i].tolist())) for b in single for i in range(2)}
    assert {(b["case_id"][i], tuple(b["start"][i].tolist())) for bs in batches for b in bs for i in range(2)} == windows


def test_three_ranks_lose_no_case(uniform_store):
    batches = [_epoch(make_stream(uniform_store, rank=r, world_size=3)) for r in range(3)]
    assert len({len(b) for b in batches}) == 1
    assert set().union(*(set().union(*_group_cases(b)) for b in batches)) == set(uniform_store.cases)


def test_mixed_geometry_shards_evenly(mixed_store):
    streams = [make_stream(mixed_store, rank=r, world_size=2, batch_size=2) for r in range(2)]
    assert len(streams[0]) == len(streams[1])
    for stream in streams:
        for batch in stream:
            assert batch["image"].shape[0] == 2


def test_epochs_differ_and_repeat_with_the_seed(uniform_store):
    a = make_stream(uniform_store, seed=7)
    first, second = _epoch(a), _epoch(a)
    assert [[b["stream"]["epoch"][0], b["stream"]["index"][0]] for b in first] == [[0, i] for i in range(8)]
    assert [[b["stream"]["epoch"][0], b["stream"]["index"][0]] for b in second] == [[1, i] for i in range(8)]
    assert [b["start"].tolist() for b in first] != [b["start"].tolist() for b in second]
    again = make_stream(uniform_store, seed=7)
    for x, y in zip(first, _epoch(again)):
        assert_batches_equal(x, y)
    other = _epoch(make_stream(uniform_store, seed=8))
    assert [b["start"].tolist() for b in first] != [b["start"].tolist() for b in other]


def test_sources_are_mixed_by_weight(uniform_store):
    head = DatasetSource(uniform_store.url, name="head", cases=["u0", "u1"])
    tail = DatasetSource(uniform_store.url, name="tail", cases=[f"u{i}" for i in range(2, 8)], weight=0.0)
    only_head = make_stream(uniform_store, sources=[head, tail], visits_per_epoch=8)
    datasets = {d for b in only_head for d in b["dataset"]}
    assert datasets == {"head"}
    mixed = make_stream(uniform_store, sources=[head, DatasetSource(uniform_store.url, name="tail", cases=[f"u{i}" for i in range(2, 8)])], mixing="uniform", batch_size=1, samples_per_case=1, visits_per_epoch=10)
    names = [b["dataset"][0] for b in mixed]
    assert names.count("head") == names.count("tail") == 5
    assert {b["case_id"][0] for b in mixed if b["dataset"][0] == "head"} == {"u0", "u1"}


# ---------------------------------------------------------------------------------- threads, workers
def test_threads_and_worker_processes_give_the_same_batches(uniform_store):
    reference = _epoch(make_stream(uniform_store, num_threads=0))
    threaded = _epoch(make_stream(uniform_store, num_threads=2))
    stream = make_stream(uniform_store, num_threads=1)
    loaded = list(stream.loader(num_workers=2))
    assert len(reference) == len(threaded) == len(loaded) == 8
    for a, b, c in zip(reference, threaded, loaded):
        assert_batches_equal(a, b)
        assert_batches_equal(a, c)
    assert stream.state_dict()["epoch"] == 1 and stream.state_dict()["next_batch"] == 0


# ---------------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def mni_store(tmp_path_factory, mni_t1_path):
    """The MNI152 T1 (uint8, 189x233x197 voxels, 1 mm) written like ingest writes it."""
    t1 = read_volume(mni_t1_path)
    volume = Volume(t1.numpy(), t1.affine, modality="MR")
    url = str(tmp_path_factory.mktemp("mni") / "mni.zarr")
    OMEZarrStore(url, mode="a").write_case("mni152", volume, attrs={"intensity": intensity_stats(volume)})
    return url, volume


def test_mni_patches_are_96_cubes_of_the_template(mni_store):
    url, volume = mni_store
    data = volume.numpy()
    raw = PatchStream([url], patch_size=96, batch_size=2, samples_per_case=2, intensity="none", num_threads=2, seed=1, rank=0, world_size=1)
    scaled = PatchStream([url], patch_size=96, batch_size=2, samples_per_case=2, num_threads=2, seed=1, rank=0, world_size=1)
    for a, b in zip(raw, scaled):
        assert a["image"].shape == (2, 1, 96, 96, 96)
        assert a["case_id"] == ["mni152", "mni152"] and a["dataset"] == ["mni", "mni"]
        torch.testing.assert_close(a["spacing"], torch.ones(2, 3, dtype=torch.float64))
        for i in range(2):
            start = a["start"][i].tolist()
            assert all(0 <= s <= n - 96 for s, n in zip(start, data.shape[1:]))
            window = data[0, start[0] : start[0] + 96, start[1] : start[1] + 96, start[2] : start[2] + 96]
            np.testing.assert_array_equal(a["image"][i, 0].numpy(), window)
            np.testing.assert_allclose(a["origin"][i].numpy(), (volume.affine @ [start[2], start[1], start[0], 1])[:3])
        # uint8 scales by 1/255 into [0, 1]
        torch.testing.assert_close(b["image"], a["image"] / 255)
        assert b["image"].min() >= 0 and b["image"].max() <= 1


def test_patch_affine_of_an_oblique_case():

    affine = np.array([[0.0, 0.0, 2.0, -5.0], [0.0, -1.0, 0.0, 7.0], [3.0, 0.0, 0.0, 1.0], [0, 0, 0, 1]])
    patch = patch_affine(affine, (2, -1, 3))  # start (z, y, x)
    for voxel in ([0, 0, 0], [1, 2, 3]):  # array order (z, y, x); the case affine takes (x, y, z)
        np.testing.assert_allclose(patch @ [*voxel, 1], affine @ [voxel[2] + 3, voxel[1] - 1, voxel[0] + 2, 1])


def test_patch_size_object_and_repr(uniform_store):
    stream = make_stream(uniform_store, patch_size=PatchSize(mm=(6, 10, 12)))
    assert stream.patch_shapes[0][0] == (6, 10, 12)
    assert "uniform: 8" in repr(stream) and "batches/epoch=8" in repr(stream)


# ---------------------------------------------------------------------------------- label sampling
def test_foreground_ratio_one_puts_foreground_in_every_patch(mixed_store):
    """Including ``big``, whose only foreground is a 33-voxel lesion between the coarse-level grid points."""
    sources = [DatasetSource(mixed_store.url, label="seg")]
    stream = make_stream(mixed_store, sources=sources, patch_size=16, sampler=LabelSampler(1.0), samples_per_case=4)
    seen = set()
    for batch in stream:
        _check_batch(batch, mixed_store)
        for i, case_id in enumerate(batch["case_id"]):
            assert batch["label"][i].any(), f"{case_id} at {batch['start'][i].tolist()}"
            seen.add(case_id)
    assert seen == set(mixed_store.cases)


def test_foreground_ratio_zero_rarely_finds_the_small_lesion(mixed_store):
    sources = [DatasetSource(mixed_store.url, cases=["big"], label="seg")]
    uniform = make_stream(mixed_store, sources=sources, patch_size=16, sampler=LabelSampler(0.0), samples_per_case=20)
    hits = [bool(b["label"][i].any()) for b in uniform for i in range(2)]
    assert len(hits) == 40 and sum(hits) <= 4  # 16^3 windows hit a 5-voxel ball in ~1% of positions


def test_class_locations_are_exactly_the_label_voxels(mixed_store):
    case = next(c for c in index_source(DatasetSource(mixed_store.url, label="seg")) if c.case_id == "iso_a")
    locations = CaseReader(case, OMEZarrStore(case.store), ChunkCache(0), "none").class_locations()
    label = mixed_store.cases["iso_a"].label[0]
    assert sorted(locations) == [1, 2]
    for value in (1, 2):
        assert sorted(map(tuple, locations[value].tolist())) == sorted(map(tuple, np.argwhere(label == value).tolist()))


def test_class_locations_subsample_uniformly_across_chunks(tmp_path, monkeypatch):
    """A class spanning two Z chunk rows (64 + 16 slices) is subsampled in proportion to each."""
    label = np.zeros((80, 20, 20), np.int32)
    label[50:80] = 1  # 14 slices in the first chunk row, 16 in the second
    label[0, 0, :3] = 2
    url = str(tmp_path / "tall.zarr")
    write(OMEZarrStore(url, mode="a"), StoreFixture(url), "tall", encoded((80, 20, 20)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), label)
    monkeypatch.setattr(reader_module, "MAX_LOCATIONS_PER_CLASS", 3000)
    (case,) = index_source(DatasetSource(url, label="seg"))
    first = CaseReader(case, OMEZarrStore(case.store), ChunkCache(0), "none").class_locations()
    again = CaseReader(case, OMEZarrStore(case.store), ChunkCache(0), "none").class_locations()
    assert len(first[1]) == 3000 and len(np.unique(first[1], axis=0)) == 3000
    assert np.all(label[tuple(first[1].T)] == 1)
    np.testing.assert_array_equal(first[1], again[1])  # the same in every worker and rank
    assert abs(np.mean(first[1][:, 0] < 64) - 14 / 30) < 0.04
    assert first[2].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2]]


# ---------------------------------------------------------------------------------- levels, ranks, fixed epochs
def test_a_coarser_level_has_its_own_spacing_and_affine(mixed_store):
    store = OMEZarrStore(mixed_store.url)
    level1 = store.read_image("big", 1)
    label1 = store.read_label("big", level=1)
    sources = [DatasetSource(mixed_store.url, cases=["big"], label="seg", level=1)]
    stream = make_stream(mixed_store, sources=sources, patch_size=16, sampler=LabelSampler(1.0))
    assert stream.cases[0][0].spatial_shape == level1.spatial_shape == (36, 70, 65)
    image, label = level1.numpy(), label1.numpy()
    for batch in stream:
        assert batch["spacing"].tolist() == [[2.0, 2.0, 2.0]] * 2
        for i, start in enumerate(batch["start"].tolist()):
            np.testing.assert_array_equal(batch["image"][i].numpy(), expected_window(image, start, (16, 16, 16), [image.min()]))
            np.testing.assert_array_equal(batch["label"][i].numpy(), expected_window(label, start, (16, 16, 16), [0]))
            np.testing.assert_allclose(batch["origin"][i].numpy(), (level1.affine @ [start[2], start[1], start[0], 1])[:3])
            assert batch["label"][i].any()  # the lesion survives at level 1 (stride 2)


def test_rank_comes_from_the_environment_and_set_distributed(uniform_store, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stream = PatchStream([uniform_store.url], patch_size=8, samples_per_case=2, intensity="none", num_threads=0, seed=3)
    assert (stream.rank, stream.world_size) == (1, 2) and len(stream) == 4
    explicit = make_stream(uniform_store, rank=1, world_size=2)
    for a, b in zip(stream, explicit):
        assert_batches_equal(a, b)
    stream.set_distributed(0, 1)
    assert len(stream) == 8
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        stream.set_distributed(2, 2)


def test_a_fixed_epoch_replays_the_same_batches(uniform_store):
    stream = make_stream(uniform_store, fixed_epoch=5)
    first, second = list(stream), list(stream)
    assert [[b["stream"]["epoch"][0], b["stream"]["index"][0]] for b in first] == [[5, i] for i in range(8)]
    for a, b in zip(first, second):
        assert_batches_equal(a, b)
    assert stream.state_dict()["epoch"] == 5 and stream.state_dict()["next_batch"] == 0


def test_spawned_workers_give_the_same_batches(uniform_store):
    """Spawned workers get a pickled stream (without its readers, cache and locks) and rebuild them."""
    reference = list(make_stream(uniform_store))
    stream = make_stream(uniform_store, num_threads=1)
    assert_batches_equal(next(iter(stream)), reference[0])  # the stream now holds open readers and a cache
    loaded = list(stream.loader(num_workers=1, multiprocessing_context="spawn"))
    assert len(loaded) == 7
    for a, b in zip(reference[1:], loaded):
        assert_batches_equal(a, b)


def test_one_store_at_two_levels_and_with_and_without_labels(mixed_store):
    """Sources may share a store: each patch still comes from its own source's level and label."""
    store = OMEZarrStore(mixed_store.url)
    arrays = {lvl: (store.read_image("big", lvl).numpy(), store.read_label("big", level=lvl).numpy()) for lvl in (0, 1)}
    sources = [
        DatasetSource(mixed_store.url, name="fine", cases=["big"]),
        DatasetSource(mixed_store.url, name="coarse", cases=["big"], level=1, label="seg"),
    ]
    stream = make_stream(mixed_store, sources=sources, patch_size=12, batch_size=1, samples_per_case=3, visits_per_epoch=8, num_threads=2)
    seen = set()
    for batch in stream:
        level = {"fine": 0, "coarse": 1}[batch["dataset"][0]]
        seen.add(level)
        assert batch["spacing"][0].tolist() == [2.0 ** level] * 3
        image, label = arrays[level]
        start = batch["start"][0].tolist()
        np.testing.assert_array_equal(batch["image"][0].numpy(), expected_window(image, start, (12, 12, 12), [image.min()]))
        assert ("label" in batch) == (level == 1)
        if level == 1:
            np.testing.assert_array_equal(batch["label"][0].numpy(), expected_window(label, start, (12, 12, 12), [0]))
    assert seen == {0, 1}


def test_percentile_scaling_uses_the_body_statistics_and_falls_back_on_old_stores(tmp_path):
    """A CT padded with -3024 outside a disk-shaped field of view, air -1000 inside it: with PUMIT's body
    percentiles (store format 2) air maps to ~0; an old store's all-voxel percentiles map it to ~0.5."""
    _, y, x = np.indices((8, 40, 40))
    image = np.full((8, 40, 40), -1000, np.int16)
    image[(y - 20) ** 2 + (x - 20) ** 2 > 16**2] = -3024  # outside the field of view
    image[:, 14:26, 14:26] = 40 + (x[:, 14:26, 14:26] * 20).astype(np.int16)  # soft tissue
    volume = Volume.from_spacing(image[None], (1.0, 1.0, 1.0))
    new, old = OMEZarrStore(str(tmp_path / "new.zarr"), mode="a"), OMEZarrStore(str(tmp_path / "old.zarr"), mode="a")
    stats = intensity_stats(volume)
    assert "body" in stats[0]
    new.write_case("ct", volume, attrs={"intensity": stats})
    old.write_case("ct", volume, attrs={"intensity": [{k: v for k, v in s.items() if k != "body"} for s in stats]})
    read = {}
    for name, store in (("new", new), ("old", old)):
        batch = next(iter(PatchStream([store.url], patch_size=(8, 40, 40), batch_size=1, samples_per_case=1, num_threads=0, rank=0, world_size=1)))
        read[name] = batch["image"][0, 0]
    air = torch.from_numpy(image == -1000)
    assert read["new"][air].max() < 0.02 and read["new"][torch.from_numpy(image == -3024)].max() == 0
    assert read["old"][air].min() > 0.4  # the padding sets the all-voxel 0.5th percentile


def test_an_assumed_pixel_size_is_flagged_and_mm_patches_warn(tmp_path):
    """A PNG's 1 mm is assumed (case attrs ``spacing_assumed``): the batch says so, and sizing patches in mm
    on such cases warns (they are voxels, not mm); voxel and token sizes do not."""
    store = OMEZarrStore(str(tmp_path / "xr.zarr"), mode="a")
    volume = Volume.from_spacing(encoded((1, 30, 30))[None], (1.0, 1.0, 1.0), modality="XR")
    store.write_case("dcm", volume, attrs={"intensity": intensity_stats(volume)})
    volume.meta["spacing_assumed"] = True  # what the PNG reader sets; the store records it
    store.write_case("png", volume, attrs={"intensity": intensity_stats(volume)})
    batch = next(iter(PatchStream([store.url], patch_size=16, batch_size=2, samples_per_case=1, num_threads=0, rank=0, world_size=1)))
    assert dict(zip(batch["case_id"], batch["spacing_assumed"].tolist())) == {"png": True, "dcm": False}
    with pytest.warns(UserWarning, match="assumed pixel size"):
        PatchStream([store.url], patch_size=PatchSize(mm=16), num_threads=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PatchStream([store.url], patch_size=PatchSize(tokens=(1, 1, 1)), num_threads=0)
