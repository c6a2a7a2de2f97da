"""The annotation loop's real case: nilearn's MNI152 T1 in a store with the tiny model's features cached.

Built once per test session (the ``mni_store`` / ``mni_store_full`` fixtures of ``tests/conftest.py``) and
shared by the loop's tests (tests/active) and the napari widget's (tests/napari): writing the store and
extracting the features is most of what a loop test costs, and sessions keep to their own label maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
