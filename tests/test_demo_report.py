"""The demo's learning steps and its report: the trivial baseline, the slice split, the HTML page and its figures,
and (slow) the whole demo end to end with a quick budget."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spadkit import demo_report
from spadkit.demo import (
    HELDOUT_MARGIN,
    AnnotationRound,
    Arm,
    Budget,
    SliceTask,
    foreground_dice,
    intensity_band,
    main,
    plot_losses,
    slice_task,
)
from spadkit.io import OMEZarrStore


def test_intensity_band_finds_the_band_and_scores_only_the_masked_voxels():
    rng = np.random.default_rng(0)
    image = rng.random((4, 32, 32)).astype(np.float32)
    truth = (image > 0.3) & (image < 0.6)
    mask = np.zeros(truth.shape, bool)
    mask[1] = True
    lo, hi = intensity_band(image, truth, mask)
    assert lo == pytest.approx(0.3, abs=0.01) and hi == pytest.approx(0.6, abs=0.01)
    assert foreground_dice((image >= lo) & (image <= hi), truth) > 0.98
    wrong = truth.copy()
    wrong[~mask] = False  # voxels outside the mask must not matter
    assert intensity_band(image, wrong, mask) == (lo, hi)


def test_slice_task_keeps_held_out_slices_away_from_labelled_ones(tmp_path, mni_t1_path):
    from spadkit.demo import TISSUE_CLASSES, mni152_tissue_labels
    from spadkit.ingest import intensity_stats
    from spadkit.io import read_volume
    from spadkit.models import create_model

    volume, labels = read_volume(mni_t1_path).load(), mni152_tissue_labels()
    store = OMEZarrStore(str(tmp_path / "s.zarr"), mode="a")
    store.write_case("mni152_t1_1mm", volume, labels, attrs={"intensity": intensity_stats(volume)})
    task = slice_task(store, create_model("spad_vit_test"), labelled=3, heldout=10)
    assert len(task.labelled) == 3 and len(task.heldout) == 10 and task.image.shape == task.truth.shape == (189, 233, 197)
    assert min(abs(h - lab) for h in task.heldout for lab in task.labelled) > HELDOUT_MARGIN
    assert task.truth.mean() == pytest.approx((labels.numpy()[0] == 1).mean()) and TISSUE_CLASSES[1] == "gray matter"
    assert task.image.min() >= 0.0 and task.image.max() <= 1.0


def _metrics_csv(path: Path, keys: tuple[str, ...]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", *(f"train/{k}" for k in keys)])
        writer.writeheader()
        for step in range(1, 11):
            writer.writerow({"step": step, **{f"train/{k}": 1.0 / step for k in keys}})
    return path


def _round(rng: np.random.Generator, axis: int, edit_dice: float | None) -> AnnotationRound:
    truth = rng.random((24, 20)) > 0.5
    shown = truth ^ (rng.random(truth.shape) > 0.9)
    return AnnotationRound(axis, 7, "cold start: 41% of this z slice is tissue", rng.random(truth.shape), shown, rng.random(truth.shape) * 0.69, truth, edit_dice, int((shown != truth).sum()), None, 0.9123, 0.9456, 0.5)


def test_report_links_figures_that_exist_and_states_every_number(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.random((12, 24, 20)).astype(np.float32)
    task = SliceTask(image, image > 0.5, (1.0, 1.0, 1.0), (3, 8), (0, 5, 11))
    arms = [Arm(name, rng.random((3, 24, 20)), dice, "how") for name, dice in (("intensity band", 0.9611), ("light head", 0.9012), ("SPAD-UNETR, pretrained", 0.5567), ("SPAD-UNETR, from scratch", 0.6789))]
    metrics = {name: _metrics_csv(tmp_path / "runs" / name / "latest" / "metrics.csv", keys) for name, keys in (("tokenizer", ("psnr", "psnr_patch_mean")), ("pretrain", ("mae_textured", "mae_floor_zero")))}
    for run in ("finetune", "finetune_scratch"):
        _metrics_csv(tmp_path / "runs" / run / "latest" / "metrics.csv", ("loss",))
    Image.new("RGB", (8, 8)).save(tmp_path / "montage.png")
    plot_losses(metrics, tmp_path / "pretrain_loss.png")
    results = {
        "pretrain": demo_report.pretrain_summary(metrics, "this tokenizer reconstructs worse than each token's mean intensity"),
        "fewshot": demo_report.fewshot_figures(task, arms, tmp_path),
        "steps": [{"step": "ingest", "wall_s": 12.5, "cpu_s": 20.25, "load_average": 3.0}],
    }
    results["rounds"] = demo_report.rounds_figures([_round(rng, 0, None), _round(rng, 2, 0.8771)], results["fewshot"], tmp_path)
    page = demo_report.write_report(tmp_path, results, {"napari": "napari --plugin spadkit x.zarr/case", "JupyterLab": "jupyter lab notebooks/"})
    text = page.read_text()
    images = re.findall(r'<img src="([^"]+)"', text)
    assert set(images) == {"montage.png", "pretrain_loss.png", "fewshot_overlay.png", "finetune_loss.png", "rounds_dice.png", "rounds_overlay.png"}
    for name in images:
        with Image.open(tmp_path / name) as png:
            assert png.size[0] >= 8 and (name == "montage.png" or np.asarray(png.convert("L")).std() > 10), name
    for number in ("0.961", "0.901", "0.557", "0.679", "0.877", "0.912", "0.946"):
        assert number in text, number
    assert "does not beat the intensity band (0.557 vs 0.961)" in text and "MIM was switched off" in text
    assert "napari --plugin spadkit x.zarr/case" in text and "jupyter lab notebooks/" in text
    assert json.loads((tmp_path / "results.json").read_text())["rounds"]["rounds"][1]["edit_dice"] == 0.8771


@pytest.mark.slow
def test_quick_demo_writes_a_report_of_every_step(tmp_path, capsys):
    """The whole demo (what `make demo` runs) with a seconds-long budget: every step, the report, the continue commands."""
    budget = Budget.quick()
    assert main(tmp_path, budget=budget) == 0
    out = capsys.readouterr().out
    assert "napari --plugin spadkit" in out and "lab notebooks/" in out and "report.html" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["steps"]) == 4 and all(s["wall_s"] > 0 for s in results["steps"])
    arms = {a["name"]: a["dice"] for a in results["fewshot"]["arms"]}
    assert arms["intensity band"] > 0.85  # gray matter is nearly an intensity band (PITFALLS 19)
    assert arms["light head"] > 0.8
    rounds = results["rounds"]["rounds"]
    assert len(rounds) == budget.rounds and rounds[0]["edit_dice"] is None and rounds[1]["edit_dice"] is not None
    versions = OMEZarrStore(str(tmp_path / "demo.zarr")).label_versions("mni152_t1_1mm", "demo_gm")
    assert len(versions) == budget.rounds  # one label version per correction
    text = (tmp_path / "report.html").read_text()
    for name in re.findall(r'<img src="([^"]+)"', text):
        assert (tmp_path / name).is_file(), name
    assert f"{arms['light head']:.3f}" in text and f"{rounds[-1]['heldout_dice']:.3f}" in text
