"""benchmarks/label_efficiency.py --merge: a long run can be finished in parts without losing rows."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("nilearn")
pytest.importorskip("sklearn")

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("label_efficiency")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_merge_keeps_other_rows_and_replaces_redone_ones(bench, tmp_path):
    out = tmp_path / "le.json"
    common = ["--quick", "--arms", "random_forest", "--out", str(out), "--threads", "1"]
    bench.main([*common, "--ks", "1"])
    first = json.loads(out.read_text())
    bench.main([*common, "--ks", "4", "--merge"])
    merged = json.loads(out.read_text())
    assert sorted(r["k"] for r in merged["runs"]) == [1, 4]
    assert merged["runs"][0] == first["runs"][0]
    assert merged["settings"]["ks"] == [1, 4]
    bench.main([*common, "--ks", "4", "--merge"])  # redoing a row replaces it, never duplicates it
    assert sorted(r["k"] for r in json.loads(out.read_text())["runs"]) == [1, 4]
    bench.main([*common, "--ks", "4"])  # without --merge the file holds this run only
    assert [r["k"] for r in json.loads(out.read_text())["runs"]] == [4]


def test_merge_refuses_runs_of_another_configuration(bench, tmp_path):
    out = tmp_path / "le.json"
    common = [
        "--quick",
        "--arms",
        "random_forest",
        "--out",
        str(out),
        "--threads",
        "1",
        "--ks",
        "1",
    ]
    bench.main(common)
    with pytest.raises(SystemExit, match="other --steps"):
        bench.main([*common, "--merge", "--steps", "7"])
