"""PUMIT token-grid crops: fixed voxel shapes per level, zoomed windows resampled with a true affine,
batches that never mix anisotropy levels, and batches that MONAI reads as they are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, decollate_batch

from spadkit.data import PatchSize, PatchStream
from spadkit.io import OMEZarrStore
from spadkit.models import batch_level, total_stride
from tests.data.conftest import StoreFixture, encoded, make_stream, write


@pytest.fixture(scope="module")
def token_store(tmp_path_factory) -> StoreFixture:
    """``iso`` 1 mm (48x80x76), ``thick`` 3 x 1 x 1 mm (20x80x76), ``flat`` 2D at 0.5 mm (1x90x100),
    ``slab`` 40 x 1 x 1 mm (4x70x70, slice/pixel ratio 40: streamed as 2D)."""
    url = str(tmp_path_factory.mktemp("tokens") / "tokens.zarr")
    store, fixture = OMEZarrStore(url, mode="a"), StoreFixture(url)
    write(store, fixture, "iso", encoded((48, 80, 76), 100_000), (1.0, 1.0, 1.0), (-20.0, 10.0, 5.0))
    write(store, fixture, "thick", encoded((20, 80, 76), 200_000), (3.0, 1.0, 1.0), (1.5, -2.0, 30.0))
    write(store, fixture, "flat", encoded((1, 90, 100), 300_000), (1.0, 0.5, 0.5), (0.0, 0.0, 0.0), modality="XR")
    write(store, fixture, "slab", encoded((4, 70, 70), 400_000), (40.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    return fixture


@pytest.mark.parametrize(
    ("spacing", "shape", "level", "voxels"),
    [
        ((1.0, 1.0, 1.0), (200, 300, 300), 0, (80, 160, 160)),  # PUMIT's 5 x 10 x 10 tokens of 16^3
        ((3.0, 0.75, 0.75), (60, 512, 512), 2, (20, 160, 160)),  # depth stride 16 >> 2 = 4
        ((2.5, 0.2, 0.2), (60, 512, 512), 3, (10, 160, 160)),
        ((1.0, 0.5, 0.5), (1, 512, 512), 5, (1, 160, 160)),  # 2D: one depth token of one slice
        ((40.0, 1.0, 1.0), (8, 512, 512), 5, (1, 160, 160)),  # ratio >= 32: treated as 2D
        ((20.0, 1.0, 1.0), (8, 512, 512), 4, (5, 160, 160)),  # ratio 20: five depth tokens of one slice
    ],
)
def test_token_grid_voxels_follow_the_spacing_rule(spacing, shape, level, voxels):
    size = PatchSize(tokens=(5, 10, 10))
    assert size.level_for(spacing, shape) == level
    assert size.shape_for(spacing, shape) == voxels
    assert PatchSize(tokens=(5, 10, 10), multiple=total_stride).shape_for(spacing, shape) == voxels


def test_zoom_draws_have_pumits_ranges_and_probabilities_and_keep_the_level():
    size = PatchSize(tokens=(5, 10, 10))
    rng = np.random.default_rng(0)
    iso = np.array([size.draw_zoom((1.0, 1.0, 1.0), (300, 400, 400), rng) for _ in range(4000)])
    assert 0.45 < np.mean(iso[:, 1] != 1) < 0.55 and 0.25 < np.mean(iso[:, 0] != 1) < 0.35
    assert np.all(iso[:, 1] == iso[:, 2])  # one in-plane zoom
    zoomed = iso[iso[:, 1] != 1, 1]
    assert zoomed.min() >= 0.75 and zoomed.max() <= 2.0 and zoomed.max() > 1.9
    assert iso[iso[:, 0] != 1, 0].min() >= 0.8 and iso[:, 0].max() <= 1.25
    # the in-plane zoom is capped by the case's size over the patch's (400 / 160 > 2; 240 / 160 = 1.5)
    small = np.array([size.draw_zoom((1.0, 1.0, 1.0), (300, 240, 400), rng) for _ in range(500)])
    assert small[:, 1].max() <= 1.5
    # thick slices never get a depth zoom, and the in-plane zoom keeps the level (2.5 / 0.65 = 3.85: level 1)
    ct = np.array([size.draw_zoom((2.5, 0.65, 0.65), (100, 512, 512), rng) for _ in range(2000)])
    assert np.all(ct[:, 0] == 1)
    levels = {size.level_for((2.5, 0.65 * z, 0.65 * z), (100, 512, 512)) for z in ct[:, 1]}
    assert levels == {1}
    assert ct[:, 1].min() > 0.96 and ct[:, 1].max() > 1.8  # PUMIT's 0.75 would make it level 2
    # 2D images zoom in-plane only; the voxel modes never zoom
    flat = np.array([size.draw_zoom((1.0, 0.5, 0.5), (1, 512, 512), rng) for _ in range(200)])
    assert np.all(flat[:, 0] == 1) and np.any(flat[:, 1] != 1)
    assert PatchSize(voxels=96).draw_zoom((1.0, 1.0, 1.0), (300, 400, 400), rng) == (1.0, 1.0, 1.0)


def _stored_coordinates(batch: dict, i: int, case_affine: np.ndarray) -> np.ndarray:
    """Stored ``(z, y, x)`` voxel coordinates ``(3, Z, Y, X)`` that the batch affine says each voxel samples."""
    grid = np.indices(batch["image"].shape[2:], dtype=np.float64).reshape(3, -1)
    world = batch["affine"][i].numpy() @ np.vstack([grid, np.ones(grid.shape[1])])
    stored_xyz = np.linalg.inv(case_affine) @ world
    return stored_xyz[2::-1].reshape(3, *batch["image"].shape[2:])


def test_zoomed_crops_are_resampled_windows_whose_affine_and_spacing_are_true(token_store):
    """Voxels encode their stored position linearly, and linear interpolation of a ramp is exact: every
    delivered voxel must hold the code of the stored point that its affine names."""
    size = PatchSize(tokens=(2, 2, 2), zoom_prob=1.0, zoom_z_prob=1.0)
    stream = make_stream(token_store, patch_size=size, batch_size=1, samples_per_case=6)
    zooms, seen = [], set()
    for batch in stream:
        case_id = batch["case_id"][0]
        case = token_store.cases[case_id]
        seen.add(case_id)
        zoom = batch["zoom"][0].numpy()
        zooms.append(zoom)
        np.testing.assert_allclose(batch["spacing"][0].numpy(), np.asarray(case.spacing) * zoom)
        assert batch["level"].tolist() == [size.level_for(case.spacing, case.image.shape[1:])]
        assert tuple(batch["image"].shape[2:]) == size.shape_for(case.spacing, case.image.shape[1:])
        coords = _stored_coordinates(batch, 0, case.affine)
        inside = np.all([(c >= 0) & (c <= n - 1) for c, n in zip(coords, case.image.shape[1:])], axis=0)
        assert inside.mean() > 0.5, case_id
        offset = case.image.flat[0]
        want = offset + coords[0] * 10000 + coords[1] * 100 + coords[2]
        np.testing.assert_allclose(batch["image"][0, 0].numpy()[inside], want[inside], atol=0.25)
    assert seen == set(token_store.cases)
    zooms = np.array(zooms)
    assert np.any(zooms[:, 1] > 1.05) and np.any(zooms[:, 1] < 0.95)  # zoomed out and in


def test_labels_of_zoomed_crops_are_the_nearest_stored_voxel(mixed_store):
    from spadkit.data import DatasetSource

    size = PatchSize(tokens=(1, 1, 1), multiple=(16, 16, 16), zoom_prob=1.0, zoom=(0.75, 1.5))
    stream = make_stream(mixed_store, sources=[DatasetSource(mixed_store.url, cases=["iso_a", "iso_b"], label="seg")], patch_size=size, samples_per_case=4)
    for batch in stream:
        for i, case_id in enumerate(batch["case_id"]):
            case = mixed_store.cases[case_id]
            nearest = np.floor(_stored_coordinates(batch, i, case.affine) + 0.5).astype(int)
            inside = np.all([(c >= 0) & (c < n) for c, n in zip(nearest, case.label.shape[1:])], axis=0)
            want = case.label[0][tuple(np.clip(c, 0, n - 1) for c, n in zip(nearest, case.label.shape[1:]))]
            np.testing.assert_array_equal(batch["label"][i, 0].numpy()[inside], want[inside])


def test_a_slab_with_ratio_32_or_more_is_streamed_as_2d(token_store):
    stream = make_stream(token_store, sources=[token_store.url], patch_size=PatchSize(tokens=(5, 2, 2)), batch_size=1, samples_per_case=1)
    shapes = {b["case_id"][0]: (tuple(b["image"].shape[2:]), b["level"].item()) for b in stream}
    assert shapes["slab"] == ((1, 32, 32), 5) and shapes["flat"] == ((1, 32, 32), 5)
    assert shapes["iso"] == ((80, 32, 32), 0) and shapes["thick"] == ((40, 32, 32), 1)


def test_a_batch_never_mixes_anisotropy_levels(tmp_path):
    """Regression: 2.5 mm CTs at 0.62 and 0.65 mm pixels get the same 16 x 64 x 64 patch at levels 2 and 1;
    they were batched together and SpadViT raised mid-epoch."""
    url = str(tmp_path / "ct.zarr")
    store, fixture = OMEZarrStore(url, mode="a"), StoreFixture(url)
    for i, pixel in enumerate((0.62, 0.65)):
        write(store, fixture, f"ct{i}", encoded((20, 70, 70), 0), (2.5, pixel, pixel), (0.0, 0.0, 0.0), modality="CT")
    stream = make_stream(fixture, patch_size=PatchSize(voxels=64, multiple=total_stride), batch_size=2, samples_per_case=1)
    assert {shape for shapes in stream.patch_shapes for shape in shapes} == {(16, 64, 64)}
    batches = list(stream)
    assert batches
    for batch in batches:
        depth = batch["image"].shape[2]
        assert batch["level"].tolist() == [batch_level(batch["spacing"], depth)] * 2  # raises on mixed levels
    assert {b["level"][0].item() for b in batches} == {1, 2}


def test_batches_decollate_into_one_item_per_sample(mixed_store):
    from spadkit.data import BatchAugment

    stream = make_stream(mixed_store, batch_size=2)
    batch = BatchAugment(seed=0)(next(iter(stream)))
    items = decollate_batch(batch)
    assert len(items) == 2
    for i, item in enumerate(items):
        assert item["case_id"] == batch["case_id"][i]
        assert item["stream"] == {key: values[i] for key, values in batch["stream"].items()}
        assert torch.equal(item["image"], batch["image"][i]) and torch.equal(item["augment"]["flip"], batch["augment"]["flip"][i])


@pytest.mark.parametrize("patch", [PatchSize(voxels=8), PatchSize(tokens=(2, 2, 2), zoom_prob=1.0)])
def test_monai_reads_the_batch_affine_as_it_is(token_store, patch):
    """MONAI's MetaTensor takes the batch affine unchanged: its pixdim is the batch spacing, and its
    affine maps voxel indices in the tensor's own (Z, Y, X) order."""
    stream = make_stream(token_store, patch_size=patch, batch_size=1, samples_per_case=2)
    for batch in stream:
        tensor = MetaTensor(batch["image"][0], affine=batch["affine"][0])
        np.testing.assert_allclose(tensor.pixdim.numpy(), batch["spacing"][0].numpy(), rtol=1e-6)
        np.testing.assert_allclose(tensor.affine[:3, 3].numpy(), batch["origin"][0].numpy())


def test_the_voxel_modes_are_unchanged_by_the_token_mode(token_store):
    """PatchSize(voxels=...) streams draw no zoom: windows are read as they are (zoom 1, stored spacing)."""
    for batch in make_stream(token_store, patch_size=8, batch_size=1, samples_per_case=1):
        case = token_store.cases[batch["case_id"][0]]
        assert batch["zoom"][0].tolist() == [1.0, 1.0, 1.0]
        np.testing.assert_allclose(batch["spacing"][0].numpy(), case.spacing)


def test_stream_accepts_pumit_sized_crops_on_a_realistic_ct_shape(tmp_path):
    """(5, 10, 10) tokens on a 2.5 x 0.7 x 0.7 mm CT (ratio 3.6): 40 x 160 x 160 voxels at level 1, in batches of 2."""
    url = str(tmp_path / "ct.zarr")
    store, fixture = OMEZarrStore(url, mode="a"), StoreFixture(url)
    for i in range(2):
        write(store, fixture, f"ct{i}", np.zeros((30, 200, 180), np.int16) + i, (2.5, 0.7, 0.7), (0.0, 0.0, 0.0), modality="CT")
    stream = PatchStream([url], patch_size=PatchSize(tokens=(5, 10, 10)), batch_size=2, samples_per_case=2, intensity="none", num_threads=2, rank=0, world_size=1)
    for batch in stream:
        assert batch["image"].shape == (2, 1, 40, 160, 160) and batch["level"].tolist() == [1, 1]
