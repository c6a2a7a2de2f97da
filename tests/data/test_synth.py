"""Synthetic SynthSeg-style brains from the bundled MNI152 tissue maps."""

from __future__ import annotations

import numpy as np
import pytest

from spadkit.data.synth import SPACINGS, synth_case, tissue_maps, write_synthetic_store
from spadkit.io import OMEZarrStore


@pytest.mark.slow
def test_synthetic_cases_vary_in_contrast_and_spacing_and_reach_a_store(tmp_path):
    maps, _ = tissue_maps()
    assert maps.shape[0] == 5
    np.testing.assert_allclose(maps.sum(0), 1.0, atol=1e-5)  # tissue probabilities partition every voxel
    rng = np.random.default_rng(1)
    cases = [synth_case(rng) for _ in range(6)]
    kinds = {c.kind for c in cases}
    assert len(kinds) >= 3 and kinds <= {name for name, _, _ in SPACINGS}
    for case in cases:
        assert case.array.dtype == np.float32 and np.isfinite(case.array).all()
        assert (case.array.shape[0] == 1) == (case.kind == "2d")
        if case.kind == "thick5":
            assert case.spacing == (5.0, 0.7, 0.7)
    # contrasts differ: the gray/white-matter ordering is not fixed
    brains = [c.array for c in cases if c.kind != "2d"]
    assert np.std([float(np.percentile(b, 90)) for b in brains]) > 0.01
    report = write_synthetic_store(2, str(tmp_path / "synth.zarr"), seed=3)
    assert len(report.written) == 2 and not report.failed
    store = OMEZarrStore(str(tmp_path / "synth.zarr"))
    for case_id in store.cases():
        image = store.read_image(case_id)
        assert image.modality == "MR" and min(image.spacing) > 0.69  # 0.7 mm stored as float32
