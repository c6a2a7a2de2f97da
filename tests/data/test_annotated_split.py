"""The validation split for early stopping: fixed once, never reshuffled when labels are added."""

from __future__ import annotations

import numpy as np
import pytest

from spadkit.data import DatasetSource, PatchDataModule
from spadkit.data.plan import Split
from spadkit.errors import SpadkitError
from spadkit.volume import LabelVolume
from tests.data.test_annotated_stream import SHAPE, mni_store, slice_mask

REVIEWED = (3, 4, 9, 14, 18, 26)


def parts(dm: PatchDataModule) -> tuple[set[int], set[int]]:
    """The Z slices the training and the validation stream may use."""
    dm.setup("fit")
    return set(dm.train_stream.selections[0][0].slices), set(dm.val_stream.selections[0][0].slices)


def split_module(url: str, **kwargs) -> PatchDataModule:
    args = {"patch_size": (4, 16, 16), "batch_size": 1, "samples_per_case": 6, "num_threads": 0, "intensity": "none", "val_fraction": 0.3}
    return PatchDataModule(train=[DatasetSource(url, label="seg")], **(args | kwargs))


def test_the_split_of_a_slice_depends_on_its_name_alone():
    """Pinned values: a code change that reshuffles the splits of existing stores fails here."""
    assert [z for z in range(32) if Split(0.3).is_validation("brain", z)] == [0, 2, 4, 9, 18, 26, 28, 29, 31]
    assert [c for c in "abcdefgh" if Split(0.3, by="case").is_validation(c)] == ["b", "c", "d", "e", "f"]
    assert Split(0.3).selects("brain", 0) is False and Split(0.3, part="validation").selects("brain", 0) is True


def test_adding_reviewed_slices_never_moves_an_earlier_validation_slice(tmp_path):
    store, truth = mni_store(str(tmp_path / "m.zarr"), slices=REVIEWED)
    train, val = parts(split_module(store.url))
    assert train | val == set(REVIEWED) and not train & val and train and val
    more = (*REVIEWED, 2, 20, 28, 29)
    store.save_label("brain", LabelVolume(np.where(slice_mask(slices=more), truth, 0)[None].astype(np.uint8), store.read_image("brain").affine), annotated=slice_mask(slices=more))
    train2, val2 = parts(split_module(store.url))
    assert train2 & set(REVIEWED) == train and val2 & set(REVIEWED) == val
    assert train2 | val2 == set(more) and val2 - val  # the new slices joined a part, some of them validation


def test_training_patches_never_see_a_validation_label_and_validation_sees_only_those(tmp_path):
    store, _ = mni_store(str(tmp_path / "m.zarr"), slices=REVIEWED)
    dm = split_module(store.url)
    train, val = parts(dm)
    for stream, rows in ((dm.train_stream, train), (dm.val_stream, val)):
        for batch in stream:
            for known, start in zip(batch["annotated"][:, 0], batch["start"].tolist()):
                seen = set((np.flatnonzero(known.any(dim=2).any(dim=1).numpy()) + start[0]).tolist())
                assert seen and seen <= rows


def test_a_fully_annotated_case_is_split_by_its_slices_too(tmp_path):
    store, _ = mni_store(str(tmp_path / "m.zarr"))
    store.save_label("brain", store.read_label("brain", version=1), message="fully annotated again")
    train, val = parts(split_module(store.url))
    assert train | val == set(range(SHAPE[0])) and val == {z for z in range(SHAPE[0]) if Split(0.3).is_validation("brain", z)}


def test_a_case_split_keeps_validation_cases_out_of_training(tmp_path):
    store, _ = mni_store(str(tmp_path / "m.zarr"))
    for copy in "abcdefgh":
        store.write_case(copy, store.read_image("brain"), store.read_label("brain", version=1), attrs={"intensity": store.case_attrs("brain")["intensity"]})
    dm = split_module(store.url, val_by="case")
    dm.setup("fit")
    held_out = {c for c in [*"abcdefgh", "brain"] if Split(0.3, by="case").is_validation(c)}
    assert {c.case_id for c in dm.val_stream.cases[0]} == held_out
    assert {c.case_id for c in dm.train_stream.cases[0]} == {*"abcdefgh", "brain"} - held_out


def test_split_mistakes_name_the_fix(tmp_path):
    store, _ = mni_store(str(tmp_path / "m.zarr"), slices=(0,))  # slice 0 is a validation slice
    with pytest.raises(SpadkitError, match="the train part of the split .* holds no annotated slice"):
        split_module(store.url).setup("fit")
    with pytest.raises(SpadkitError, match="not both"):
        split_module(store.url, val=[store.url])
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\)"):
        split_module(store.url, val_fraction=1.5)
