"""benchmarks/label_efficiency.py: real targets on the right grids, the issue's schema, and a benchmark that can lose."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from spadkit.models import PretrainedCfg, create_model, save_pretrained

pytest.importorskip("nilearn")
pytest.importorskip("sklearn")

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling _label_networks
    try:
        yield importlib.import_module("label_efficiency")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def case4(bench):
    return bench.build_case("4x4x4")


def test_block_mean_and_spacing_names(bench):
    array = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    np.testing.assert_allclose(
        bench.block_mean(array, (2, 3, 1))[1, 0, 2], array[2:4, 0:3, 2].mean()
    )
    assert bench.block_mean(array, (3, 1, 2)).shape == (1, 6, 2)
    assert bench.parse_spacing("1x1x3") == (3, 1, 1)  # in-plane first, as scanners state it
    with pytest.raises(Exception, match="XxYxZ"):
        bench.parse_spacing("1x1")


def test_grids_keep_the_anatomy(bench, case4):
    """Both targets on both sides of the midline, inside the head; the 1x1x3 copy has thick axial slices."""
    assert case4.spacing == (4.0, 4.0, 4.0)
    for value in bench.TARGETS.values():
        mask = case4.labels == value
        assert mask[..., : case4.midline].any() and mask[..., case4.midline :].any()
        assert not (mask & ~case4.head).any()
    ventricles_ml = (case4.labels == 2).sum() * 64 / 1000
    assert 10 < ventricles_ml < 25  # 17.8 ml at 1 mm
    left, right = (
        (case4.labels[..., : case4.midline] == 2).sum(),
        (case4.labels[..., case4.midline :] == 2).sum(),
    )
    assert abs(left - right) < 0.25 * (left + right)  # the midline sits on the symmetry plane
    thick = bench.build_case("1x1x3")
    assert thick.spacing == (3.0, 1.0, 1.0) and thick.image.shape[0] * 3 < thick.image.shape[1]


def test_random_forest_can_lose(bench, case4):
    """The forest finds the ventricles from one labelled slice, and falls to chance when the labels are
    shuffled among the annotated voxels (so the benchmark can tell learning from none)."""
    args = bench.parse_args(["--quick", "--arms", "random_forest", "--ks", "4"])
    train = bench.TrainSettings(steps=1)
    ((rows, info),) = bench.run_case(case4, args.arms, args.ks, args.seeds, args, train)
    args.shuffle_labels = True
    ((shuffled, _),) = bench.run_case(case4, args.arms, args.ks, args.seeds, args, train)
    chance = info["chance_dice_all_head"]["ventricles"]
    assert rows[0]["dice"] > 0.4 and rows[0]["dice_unlabelled"] > 0.4
    assert shuffled[0]["dice"] < 3 * chance


@pytest.mark.slow
def test_cli_writes_the_schema_and_plot(bench, tmp_path):
    """--quick runs every arm (random-init 'pretrained' weights made here) and writes the issue's schema."""
    weights = tmp_path / "weights"
    save_pretrained(
        create_model("spad_vit_test"),
        PretrainedCfg(architecture="spad_vit_test", intensity="percentile: [0, 1]"),
        weights,
    )
    out = tmp_path / "label_efficiency.json"
    bench.main(["--quick", "--weights", str(weights), "--out", str(out), "--threads", "1"])
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert {(r["arm"], r["k"]) for r in runs} == {(arm, k) for arm in bench.ARMS for k in (1, 4)}
    for row in runs:
        assert (
            isinstance(row["target"], str)
            and isinstance(row["spacing"], str)
            and row["spacing"] == "4x4x4"
        )
        assert isinstance(row["k"], int) and isinstance(row["seed"], int)
        assert isinstance(row["dice"], float) and 0.0 <= row["dice"] <= 1.0
    grid = result["settings"]["grids"]["4x4x4"]
    assert set(grid["seconds_per_arm"]) == set(bench.ARMS)
    assert out.with_suffix(".png").stat().st_size > 10_000
