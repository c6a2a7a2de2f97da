"""Streaming from an fsspec store (``memory://``: the same code path as ``s3://``, no network)."""

from __future__ import annotations

import uuid

import numpy as np

from spadkit.data import DatasetSource, PatchStream
from spadkit.io import OMEZarrStore
from tests.data.conftest import StoreFixture, encoded, expected_window, sphere, write


def test_patches_from_an_fsspec_store_match_the_volume():
    url = f"memory://{uuid.uuid4().hex}.zarr"
    fixture = StoreFixture(url=url, cases={})
    store = OMEZarrStore(url, mode="a")
    for i in range(2):
        image = encoded((20, 24, 22), offset=i * 500_000)
        write(store, fixture, f"case{i}", image, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), label=sphere((20, 24, 22), (10, 12, 11), 6.0, (2.0, 1.0, 1.0)))
    source = DatasetSource(url, label="seg", storage_options={"skip_instance_cache": True})
    stream = PatchStream([source], patch_size=(8, 16, 16), batch_size=2, samples_per_case=2, intensity="none", num_threads=2, seed=1, rank=0, world_size=1)
    batches = list(stream)
    assert len(batches) == 2
    assert batches[0]["image"].shape[2:] == (4, 16, 16)  # 8 voxels along the finest axis cover 4 slices of 2 mm
    for batch in batches:
        for image, label, start, case_id in zip(batch["image"], batch["label"], batch["start"], batch["case_id"]):
            case = fixture.cases[case_id]
            np.testing.assert_array_equal(image.numpy(), expected_window(case.image, start.tolist(), (4, 16, 16), [case.image.min()]))
            np.testing.assert_array_equal(label.numpy(), expected_window(case.label, start.tolist(), (4, 16, 16), [0]))
