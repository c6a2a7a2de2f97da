"""The real MNI152 T1 (at 2 mm for the quick tests, 1 mm for the slow ones) in a tmp store, its gray matter (probability > 0.5) as the annotator's truth,
and the tiny SPAD-ViT at a fixed random init whose features are cached once for the whole test session (``tests/mni_session.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spadkit.io.omezarr import OMEZarrStore


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
