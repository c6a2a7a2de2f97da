"""The real MNI152 T1 (at 2 mm for the quick tests, 1 mm for the slow ones) in a tmp store, its gray matter (probability > 0.5) as the annotator's truth,
and the tiny SPAD-ViT at a fixed random init whose features are cached once for the whole module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from spadkit.active import AnnotationSession
from spadkit.demo import nilearn_file
from spadkit.ingest import intensity_stats
from spadkit.io import read_volume
from spadkit.io.omezarr import OMEZarrStore
from spadkit.models import create_model
from spadkit.volume import Volume

CASE = "mni"


def tiny_model() -> torch.nn.Module:
    """spad_vit_test at seed 0: the same weights, hence the same hash and feature cache, every time."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model("spad_vit_test")


def make_store(url: Path, step: int) -> tuple[Path, np.ndarray]:
    """Write the MNI152 T1 at every ``step``-th voxel (``step`` mm) with its features cached; return the truth."""
    volume = read_volume(nilearn_file("t1"))
    gm = read_volume(nilearn_file("gm")).numpy()[0][::step, ::step, ::step]
    if step > 1:
        affine = volume.affine.copy()
        affine[:3, :3] *= step
        volume = Volume(np.ascontiguousarray(volume.numpy()[:, ::step, ::step, ::step]), affine, modality=volume.modality)
    store = OMEZarrStore(str(url), mode="a")
    store.write_case(CASE, volume, attrs={"intensity": intensity_stats(volume)})
    AnnotationSession(store, CASE, tiny_model(), "warmup")  # computes and caches the features
    return url, (gm / gm.max() > 0.5).astype(np.int32)


@pytest.fixture(scope="session")
def mni_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The MNI152 T1 at 2 mm, (95, 117, 99), in a store with cached features; and its (Z, Y, X) gray-matter truth."""
    return make_store(tmp_path_factory.mktemp("active") / "s.zarr", 2)


@pytest.fixture(scope="session")
def mni_store_full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The MNI152 T1 at its own 1 mm, (189, 233, 197), for the slow loop tests."""
    return make_store(tmp_path_factory.mktemp("active_full") / "s.zarr", 1)


@pytest.fixture
def store(mni_store: tuple[Path, np.ndarray]) -> OMEZarrStore:
    return OMEZarrStore(str(mni_store[0]), mode="a")


@pytest.fixture
def full_store(mni_store_full: tuple[Path, np.ndarray]) -> OMEZarrStore:
    return OMEZarrStore(str(mni_store_full[0]), mode="a")


@pytest.fixture
def full_truth(mni_store_full: tuple[Path, np.ndarray]) -> np.ndarray:
    return mni_store_full[1]


@pytest.fixture
def truth(mni_store: tuple[Path, np.ndarray]) -> np.ndarray:
    return mni_store[1]


@pytest.fixture
def label_name(request: pytest.FixtureRequest) -> str:
    """A label map of its own per test (sessions never see each other's corrections)."""
    return "t" + str(abs(hash(request.node.nodeid)) % 10**8)


def truth_slice(truth: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(truth, index, axis=axis)
