"""Shared fixtures: real small volumes shipped inside installed packages (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel
import numpy as np
import pydicom.data
import pytest

from spadkit.demo import nilearn_file

NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"
PYDICOM_DATA = Path(pydicom.data.__file__).parent / "test_files"


@pytest.fixture(scope="session")
def mni_t1_path() -> Path:
    """nilearn's MNI152 2009a T1 template: 197x233x189 (x, y, z), 1 mm, RAS."""
    return nilearn_file("t1")


@pytest.fixture(scope="session")
def mni_gm_path() -> Path:
    """nilearn's MNI152 gray-matter probability map on the T1's grid."""
    return nilearn_file("gm")


@pytest.fixture(scope="session")
def mni_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The MNI152 T1 at 2 mm, (95, 117, 99), in a store with the tiny model's features cached; and its (Z, Y, X)
    gray-matter truth. Shared by the loop's and the napari widget's tests: give each session a label map of its own."""
    from tests.mni_session import make_store  # torch and the loop: only for the tests that use them

    return make_store(tmp_path_factory.mktemp("mni2mm") / "s.zarr", 2)


@pytest.fixture(scope="session")
def mni_store_full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The MNI152 T1 at its own 1 mm, (189, 233, 197), likewise, for the slow loop tests."""
    from tests.mni_session import make_store

    return make_store(tmp_path_factory.mktemp("mni1mm") / "s.zarr", 1)


@pytest.fixture
def two_token_crops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full fine-tunes that sessions start train on crops of 2 tokens per axis (32 voxels at 2 mm), as
    tests/active/test_finetune's QUICK does; for front-ends that have no crop option (the command, the widget)."""
    from spadkit.active import finetune

    start = finetune.start
    monkeypatch.setattr(finetune, "start", lambda session, **kwargs: start(session, **{**kwargs, "crop_tokens": 2}))


@pytest.fixture(scope="session")
def nibabel_data() -> Path:
    return NIBABEL_DATA


@pytest.fixture(scope="session")
def pydicom_data() -> Path:
    return PYDICOM_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one torch thread (small models: faster and steadier on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def write_nifti_array(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Save a NIfTI array given in nibabel's (x, y, z[, c]) order."""
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


class HostilePickle:
    """Unpickling this runs a shell command that creates ``marker`` (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
