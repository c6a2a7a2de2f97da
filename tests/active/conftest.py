"""The real MNI152 T1 in a tmp store, its gray matter (probability > 0.5) as the annotator's truth,
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

CASE = "mni"


def tiny_model() -> torch.nn.Module:
    """spad_vit_test at seed 0: the same weights, hence the same hash and feature cache, every time."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model("spad_vit_test")


@pytest.fixture(scope="session")
def mni_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A store holding the MNI152 T1 (189, 233, 197) 1 mm with cached features; and the (Z, Y, X) gray-matter truth."""
    url = tmp_path_factory.mktemp("active") / "s.zarr"
    volume = read_volume(nilearn_file("t1"))
    store = OMEZarrStore(str(url), mode="a")
    store.write_case(CASE, volume, attrs={"intensity": intensity_stats(volume)})
    gm = read_volume(nilearn_file("gm")).numpy()[0]
    AnnotationSession(store, CASE, tiny_model(), "warmup")  # computes and caches the features
    return url, (gm / gm.max() > 0.5).astype(np.int32)


@pytest.fixture
def store(mni_store: tuple[Path, np.ndarray]) -> OMEZarrStore:
    return OMEZarrStore(str(mni_store[0]), mode="a")


@pytest.fixture
def truth(mni_store: tuple[Path, np.ndarray]) -> np.ndarray:
    return mni_store[1]


@pytest.fixture
def label_name(request: pytest.FixtureRequest) -> str:
    """A label map of its own per test (sessions never see each other's corrections)."""
    return "t" + str(abs(hash(request.node.nodeid)) % 10**8)


def truth_slice(truth: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(truth, index, axis=axis)
