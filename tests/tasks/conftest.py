"""Tiny real batches for the pretraining tasks: crops of nilearn's MNI152 T1 (1 mm, RAS)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from spadkit.io import read_volume
from tests.tasks.helpers import make_batch


@pytest.fixture(autouse=True, scope="package")
def _single_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine OpenMP's
    thread barriers made these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# brain-centred crop of the (Z, Y, X) = (189, 233, 197) template
Z0, Y0, X0 = 70, 90, 66


@pytest.fixture(scope="session")
def mni_crop(mni_t1_path) -> np.ndarray:
    """``(32, 64, 64)`` float32 crop of the MNI152 T1 at 1 mm, scaled to [0, 1]."""
    volume = read_volume(mni_t1_path)
    assert volume.spacing == (1.0, 1.0, 1.0)
    crop = np.asarray(volume.array[0, Z0 : Z0 + 32, Y0 : Y0 + 64, X0 : X0 + 64], dtype=np.float32)
    return (crop - crop.min()) / (crop.max() - crop.min())


@pytest.fixture(scope="session")
def batches(mni_crop) -> dict[str, dict[str, Any]]:
    """One batch per spacing kind: isotropic 3D, anisotropic 3D (4 mm slices, level 2), 2D."""
    return {
        "iso": make_batch([mni_crop], [(1.0, 1.0, 1.0)], ["MR"]),
        "aniso": make_batch([mni_crop[::4]], [(4.0, 1.0, 1.0)], ["MR"]),  # (8, 64, 64)
        "2d": make_batch([mni_crop[16:17]], [(1.0, 1.0, 1.0)], ["MR"]),
    }
