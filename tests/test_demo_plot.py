"""The demo's loss plot draws every diagnostic beside the trivial baseline it must beat."""

from __future__ import annotations

import csv

from PIL import Image

from spadkit.demo import _panel, plot_losses


def test_each_diagnostic_shares_a_panel_with_its_baseline():
    assert _panel("psnr") == _panel("psnr_patch_mean") != _panel("l1")
    assert _panel("mim") == _panel("mim_floor_entropy") == _panel("mim_floor_position") != _panel("loss")
    assert _panel("mae_textured") == _panel("mae_floor_zero") != _panel("mae")
    assert _panel("mi_content_given_position") == _panel("mi_code_position")
    assert _panel("codes_used") is None  # a count on its own scale stays in the CSV


def test_plot_has_one_row_per_run_and_a_column_per_panel(tmp_path):
    runs = {}
    for name, keys in (("tokenizer", ("l1", "psnr", "psnr_patch_mean", "codes_used")), ("pretrain", ("loss",))):
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", *(f"train/{k}" for k in keys)])
            writer.writeheader()
            for step in range(1, 11):
                writer.writerow({"step": step, **{f"train/{k}": step * 0.1 for k in keys}})
        runs[name] = path
    width, height = Image.open(plot_losses(runs, tmp_path / "plot.png")).size
    assert (width, height) == (round(4.6 * 2 * 110), round(3.2 * 2 * 110))  # 2 runs x (losses, PSNR) panels
