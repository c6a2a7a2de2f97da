"""Stores for the streaming tests: small synthetic cases whose voxel values encode their position.

Every image voxel holds ``offset + z * 10000 + y * 100 + x`` (int32, exact in
float32), so a patch read with ``intensity="none"`` can be compared exactly with
the window it claims to come from (``batch["start"]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from spadkit.data import PatchStream
from spadkit.ingest import intensity_stats
from spadkit.io import OMEZarrStore
from spadkit.volume import LabelVolume, Volume


@dataclass
class Case:
    """What was written for one case: the arrays ``(C, Z, Y, X)`` and the geometry."""

    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray


@dataclass
class StoreFixture:
    url: str
    cases: dict[str, Case] = field(default_factory=dict)


def encoded(shape_zyx, offset: int = 0) -> np.ndarray:
    """``(Z, Y, X)`` int32 whose value is ``offset + z * 10000 + y * 100 + x``."""
    z, y, x = np.indices(shape_zyx, dtype=np.int64)
    return (offset + z * 10000 + y * 100 + x).astype(np.int32)


def sphere(shape_zyx, centre_zyx, radius_mm: float, spacing=(1.0, 1.0, 1.0), value: int = 1) -> np.ndarray:
    """``(Z, Y, X)`` int32 ball of ``value`` (radius in mm, so it is round on anisotropic grids)."""
    grid = np.indices(shape_zyx, dtype=np.float64)
    dist2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre_zyx, spacing))
    return np.where(dist2 <= radius_mm**2, value, 0).astype(np.int32)


def write(store: OMEZarrStore, fixture: StoreFixture, case_id: str, image: np.ndarray, spacing, origin, label=None, modality="MR") -> None:
    """Write a case with the intensity statistics ingest records, and remember its arrays."""
    image = image if image.ndim == 4 else image[None]
    volume = Volume.from_spacing(image, spacing, origin, modality=modality)
    label_volume = None if label is None else LabelVolume(label[None] if label.ndim == 3 else label, volume.affine, classes={0: "background", 1: "ball", 2: "box"})
    store.write_case(case_id, volume, label_volume, attrs={"intensity": intensity_stats(volume, label_volume)})
    fixture.cases[case_id] = Case(image, None if label is None else label_volume.numpy(), tuple(float(s) for s in spacing), volume.affine.copy())


@pytest.fixture(scope="session")
def mixed_store(tmp_path_factory) -> StoreFixture:
    """One store of mixed geometry, every case with a ``seg`` label:

    * ``iso_a``, ``iso_b``: 40x48x44 voxels, 1 mm (``iso_a`` has a ball of class 1 and a box of class 2);
    * ``aniso``: 12x48x44, 3 x 1 x 1 mm (Z, Y, X);
    * ``flat``: a 2D image, 1x50x60 at 0.5 mm in-plane;
    * ``two_ch``: 2 channels, 20x24x22, 1 mm (channel 1 runs downwards, so the channel minima differ);
    * ``big``: 72x140x130, 1 mm, several 64^3 chunks and three pyramid levels; its label is
      one small lesion (a 2 mm ball, 33 voxels) centred off the 4-voxel grid of the coarsest level.
    """
    url = str(tmp_path_factory.mktemp("data") / "mixed.zarr")
    store = OMEZarrStore(url, mode="a")
    fx = StoreFixture(url)

    label_a = sphere((40, 48, 44), (20, 24, 22), 6)
    label_a[5:9, 5:9, 30:36] = 2
    write(store, fx, "iso_a", encoded((40, 48, 44), 100_000), (1.0, 1.0, 1.0), (-20.0, 10.0, 5.0), label_a)
    write(store, fx, "iso_b", encoded((40, 48, 44), 600_000), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), sphere((40, 48, 44), (10, 30, 12), 5))
    write(store, fx, "aniso", encoded((12, 48, 44), 200_000), (3.0, 1.0, 1.0), (1.5, -2.0, 30.0), sphere((12, 48, 44), (6, 20, 20), 8, (3.0, 1.0, 1.0)))
    write(store, fx, "flat", encoded((1, 50, 60), 300_000), (1.0, 0.5, 0.5), (0.0, 0.0, 0.0), sphere((1, 50, 60), (0, 25, 30), 6, (1.0, 0.5, 0.5)), modality="XR")
    two = encoded((20, 24, 22), 400_000)
    write(store, fx, "two_ch", np.stack([two, 900_000 - two]), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), sphere((20, 24, 22), (10, 12, 11), 4))
    write(store, fx, "big", encoded((72, 140, 130), 0), (1.0, 1.0, 1.0), (10.0, 20.0, 30.0), sphere((72, 140, 130), (38, 70, 66), 2))
    return fx


@pytest.fixture(scope="session")
def uniform_store(tmp_path_factory) -> StoreFixture:
    """Eight 1 mm cases ``u0``..``u7`` of 16x20x18 voxels (one patch shape), each with a ball label."""
    url = str(tmp_path_factory.mktemp("data") / "uniform.zarr")
    store = OMEZarrStore(url, mode="a")
    fx = StoreFixture(url)
    for i in range(8):
        write(store, fx, f"u{i}", encoded((16, 20, 18), 1_000_000 + 100_000 * i), (1.0, 1.0, 1.0), (float(i), 0.0, 0.0), sphere((16, 20, 18), (8, 10, 9), 3))
    return fx


def expected_window(volume: np.ndarray, start, size, pad) -> np.ndarray:
    """Reference crop of ``volume`` ``(C, Z, Y, X)`` at ``start`` ``(z, y, x)``; outside the volume,
    channel ``c`` holds ``pad[c]``. Written without the library's window arithmetic."""
    out = np.empty((volume.shape[0], *size), dtype=np.float64)
    out[...] = np.asarray(pad, dtype=np.float64)[:, None, None, None]
    index = [np.arange(s, s + n) for s, n in zip(start, size)]
    inside = [(i >= 0) & (i < length) for i, length in zip(index, volume.shape[1:])]
    target = np.ix_(*[np.flatnonzero(m) for m in inside])
    source = np.ix_(*[i[m] for i, m in zip(index, inside)])
    for c in range(volume.shape[0]):
        out[c][target] = volume[c][source]
    return out


def assert_batches_equal(a: dict, b: dict) -> None:
    """Two batches are the same batch: position, cases, windows and voxels."""
    assert a.keys() == b.keys()
    assert a["stream"] == b["stream"]
    assert a["case_id"] == b["case_id"]
    assert a["dataset"] == b["dataset"]
    for key in ("start", "spacing", "zoom", "level", "origin", "affine", "image", "label"):
        if key in a:
            assert torch.equal(a[key], b[key]), key


def make_stream(fixture: StoreFixture, **kwargs) -> PatchStream:
    """A stream over one fixture store with small patches and raw intensities (test defaults)."""
    args = {"patch_size": 8, "batch_size": 2, "samples_per_case": 2, "intensity": "none", "num_threads": 0, "seed": 3, "rank": 0, "world_size": 1}
    args.update(kwargs)
    sources = args.pop("sources", [fixture.url])
    return PatchStream(sources, **args)
