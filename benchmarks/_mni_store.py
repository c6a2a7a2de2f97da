"""The MNI152 case the annotation-session benchmarks share: a fresh store and its gray-matter truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spadkit.demo import nilearn_file
from spadkit.ingest import intensity_stats
from spadkit.io import read_volume
from spadkit.io.omezarr import OMEZarrStore

#: The case name of the MNI152 T1 in :func:`mni_store`.
CASE = "mni"


def mni_store(root: Path) -> tuple[OMEZarrStore, np.ndarray]:
    """A new store ``root/mni.zarr`` holding nilearn's MNI152 T1 (1 mm, (189, 233, 197)) as case ``"mni"``.

    Returns:
        The store (mode ``"a"``, intensity statistics recorded as ingest records them) and the
        simulated annotator's truth ``(Z, Y, X)`` int32: gray-matter probability > 0.5.
    """
    volume = read_volume(nilearn_file("t1"))
    gm = read_volume(nilearn_file("gm")).numpy()[0]
    store = OMEZarrStore(str(root / "mni.zarr"), mode="a")
    store.write_case(CASE, volume, attrs={"intensity": intensity_stats(volume)})
    return store, (gm / gm.max() > 0.5).astype(np.int32)
