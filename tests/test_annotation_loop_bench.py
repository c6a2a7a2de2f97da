"""benchmarks/annotation_loop.py: its JSON has the issue's schema, and its comparison of slice orders can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import annotation_loop as bench
from spadkit.active import Suggestion

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The benchmark's ``--quick`` run as ``make bench`` starts it (a subprocess; a napari viewer when a display exists)."""
    out = tmp_path_factory.mktemp("loop") / "loop.json"
    subprocess.run([sys.executable, "benchmarks/annotation_loop.py", "--quick", "--out", str(out)], cwd=ROOT, check=True, timeout=600)
    assert out.with_suffix(".png").stat().st_size > 10_000
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_writes_the_issues_schema(quick):
    settings = quick["settings"]
    assert settings["volumes"] == ["4mm", "4x4x12mm"] and settings["rounds"] == 4
    rows = quick["rounds"]
    assert len(rows) == len(settings["volumes"]) * len(bench.ORDERS) * len(settings["seeds"]) * settings["rounds"]
    for row in rows:
        assert row["order"] in bench.ORDERS and isinstance(row["seed"], int) and 1 <= row["round"] <= 4
        assert 0.0 < row["dice"] <= 1.0 and 0.0 < row["submit_to_refresh_s"] < 60.0
        assert isinstance(row["bytes_written"], int) and row["bytes_written"] > 0
        assert bench.offered(row["axis"], row["index"])  # no held-out slice was given to the annotator
    runs = {(r["volume"], r["order"]) for r in rows}
    assert len(runs) == 6 and {r["axis"] for r in rows if r["order"] == "even"} == {0}
    if os.environ.get("DISPLAY"):
        assert quick["gui_stall_max_ms"] >= quick["gui_stall"]["rounds"][0]["learning_max_ms"] > 0
    else:
        assert quick["gui_stall_max_ms"] is None
    for volume in settings["volumes"]:
        summary = quick["summary"][volume]
        assert summary["rounds_to_random_final"]["random"] <= 4  # random reaches its own final Dice by definition


def test_bisection_order_visits_every_slot_coarse_to_fine():
    assert bench.bisection_order(10) == [5, 2, 8, 1, 4, 7, 9, 0, 3, 6]
    assert sorted(bench.bisection_order(7)) == list(range(7))


def test_summary_finds_the_first_round_at_random_final_dice():
    rows = [
        {"volume": "v", "order": order, "seed": seed, "round": k + 1, "dice": dice, "submit_to_refresh_s": 0.5, "bytes_written": 10}
        for order, curve in {"suggested": [0.5, 0.8, 0.9], "random": [0.5, 0.6, 0.7], "even": [0.4, 0.5, 0.6]}.items()
        for seed in (0, 1)
        for k, dice in enumerate(curve)
    ]
    summary = bench.summarise(rows, ["v"], target_rounds=2)["v"]
    assert summary["random_final_dice"] == pytest.approx(0.7)
    assert summary["rounds_to_random_final"] == {"suggested": 2, "random": 3, "even": None}
    assert summary["target_met"]
    assert not bench.summarise(rows, ["v"], target_rounds=1)["v"]["target_met"]


@pytest.mark.slow
def test_a_ranking_stuck_on_one_slice_loses_to_even_spacing(tmp_path, monkeypatch):
    """The comparison is not rigged: suggestions that always name the same slice fail the target and trail even spacing."""

    def stuck(features, head, items, top=5, stride=4):
        z = features.shape[0] // 2
        return [Suggestion(0, z + (z % bench.HELD_OUT_EVERY == bench.HELD_OUT_PHASE), 1.0, "broken")]

    monkeypatch.setattr("spadkit.active.session.rank_slices", stuck)
    result = bench.main(["--quick", "--gui-rounds", "0", "--out", str(tmp_path / "stuck.json")])
    for volume in result["settings"]["volumes"]:
        summary = result["summary"][volume]
        assert not summary["target_met"]
        assert summary["mean_dice"]["suggested"][-1] < summary["mean_dice"]["even"][-1]
    assert len({(r["axis"], r["index"]) for r in result["rounds"] if r["order"] == "suggested" and r["volume"] == "4mm"}) == 1
