"""Figures and the HTML report of ``spadkit demo`` (see :func:`spadkit.demo.main`).

Every figure is a PNG beside ``report.html``; the page links them by relative path, so the
folder can be moved or zipped as a whole. The numbers also go to ``results.json``.
"""

from __future__ import annotations

import csv
import datetime
import html
import json
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from spadkit.demo import AnnotationRound, Arm, SliceTask

#: Colours: prediction fill, truth contour, voxels the annotator added / removed.
PREDICTION, TRUTH, ADDED, REMOVED = "#ffb000", "#00c8ff", "#00e060", "#ff3030"
AXES = ("axial (z)", "coronal (y)", "sagittal (x)")
DPI = 90


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _show_slice(axes: Any, image: np.ndarray, title: str) -> None:
    """A slice in RAS storage drawn with anterior/superior up (``origin="lower"``), 1 mm voxels square."""
    axes.imshow(image, cmap="gray", vmin=0, vmax=1, origin="lower", interpolation="nearest")
    axes.set_title(title, fontsize=8)
    axes.set_axis_off()


def _overlay(axes: Any, mask: np.ndarray, colour: str, alpha: float = 0.45) -> None:
    from matplotlib.colors import to_rgba

    rgba = np.zeros((*mask.shape, 4), np.float32)
    rgba[mask] = to_rgba(colour, alpha)
    axes.imshow(rgba, origin="lower", interpolation="nearest")


def _contour(axes: Any, mask: np.ndarray) -> None:
    if mask.any() and not mask.all():
        axes.contour(mask.astype(np.float32), levels=[0.5], colors=[TRUTH], linewidths=0.6, origin="lower")


# ---------------------------------------------------------------------- pretraining
def _final_values(metrics: Path, last: int = 3) -> dict[str, float]:
    """Mean of the last ``last`` logged values of every ``train/`` key of a Lightning ``metrics.csv``."""
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    values: dict[str, float] = {}
    for key in rows[0] if rows else ():
        logged = [float(r[key]) for r in rows if key.startswith("train/") and r.get(key)]
        if logged:
            values[key.removeprefix("train/")] = float(np.mean(logged[-last:]))
    return values


def pretrain_summary(metrics: Mapping[str, Path], mim_refused: str | None) -> dict[str, Any]:
    """Final diagnostics of each pretraining run beside its trivial floor, and why MIM was skipped (or None)."""
    return {"final": {name: _final_values(path) for name, path in metrics.items()}, "mim_refused": mim_refused, "figure": "pretrain_loss.png"}


# ---------------------------------------------------------------------- few-shot arms
def fewshot_figures(task: SliceTask, arms: Sequence[Arm], out: Path) -> dict[str, Any]:
    """Draw the arms on the middle held-out slice (``fewshot_overlay.png``) and the fine-tuning losses
    (``finetune_loss.png``); return the numbers."""
    from spadkit.demo import plot_losses

    middle = len(task.heldout) // 2
    z = task.heldout[middle]
    figure = _figure(2.6 * (len(arms) + 1), 3.2)
    grid = figure.subplots(1, len(arms) + 1)
    _show_slice(grid[0], task.image[z], f"T1, held-out axial slice z={z}")
    _contour(grid[0], task.truth[z])
    for axes, arm in zip(grid[1:], arms):
        _show_slice(axes, task.image[z], f"{arm.name}\nDice {arm.dice:.3f} (all held-out slices)")
        _overlay(axes, arm.probs[middle] >= 0.5, PREDICTION)
        _contour(axes, task.truth[z])
    figure.suptitle(f"gray matter from {len(task.labelled)} labelled axial slices {list(task.labelled)}: prediction (orange) vs truth (blue contour)", fontsize=9)
    figure.savefig(out / "fewshot_overlay.png", dpi=DPI)
    runs = {name: out / "runs" / folder / "latest" / "metrics.csv" for name, folder in (("fine-tune, pretrained", "finetune"), ("fine-tune, from scratch", "finetune_scratch"))}
    plot_losses({name: path for name, path in runs.items() if path.is_file()}, out / "finetune_loss.png")
    return {
        "case": "mni152_t1_1mm",
        "target": "gray matter (probability > 0.5)",
        "labelled": list(task.labelled),
        "heldout": list(task.heldout),
        "arms": [{"name": arm.name, "dice": arm.dice, "note": arm.note} for arm in arms],
        "figures": ["fewshot_overlay.png", "finetune_loss.png"],
    }


# ---------------------------------------------------------------------- annotation rounds
def rounds_figures(rounds: Sequence[AnnotationRound], fewshot: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Dice per round (``rounds_dice.png``) and, per round, the suggested slice with the prediction shown, its
    uncertainty and the annotator's correction (``rounds_overlay.png``); return the numbers."""
    numbers = [r.summary() for r in rounds]
    x = np.arange(1, len(rounds) + 1)
    figure = _figure(6.4, 4.0)
    axes = figure.subplots()
    axes.plot(x, [r.heldout_dice for r in rounds], "o-", label="session light head (held-out voxels)")
    axes.plot(x, [r.band_dice for r in rounds], "s--", label="intensity band tuned on the same corrections")
    validation = [(i, r.validation_dice) for i, r in zip(x, rounds) if r.validation_dice is not None]
    if validation:
        axes.plot(*zip(*validation), "^", label="session validation Dice (its own validation slices)")
    for arm, style in zip(fewshot["arms"], (":", "-.", "--", ":")):
        axes.axhline(arm["dice"], linestyle=style, linewidth=0.8, color="grey")
        axes.annotate(f"{arm['name']} ({len(fewshot['labelled'])} axial slices)", (x[-1], arm["dice"]), fontsize=6, color="grey", ha="right", va="bottom")
    shown = [r.heldout_dice for r in rounds] + [r.band_dice for r in rounds] + [a["dice"] for a in fewshot["arms"]]
    axes.set_ylim(min(shown) - 0.03, min(max(shown) + 0.02, 1.0))
    axes.set(xlabel="corrected slices (rounds)", ylabel="Dice, gray matter", xticks=x, title="held-out axial slices (voxels no correction reviewed)")
    axes.title.set_fontsize(9)
    figure.legend(fontsize=7, loc="outside lower center", ncols=2)
    figure.savefig(out / "rounds_dice.png", dpi=DPI)

    figure = _figure(9.6, 3.0 * len(rounds))
    grid = figure.subplots(len(rounds), 3, squeeze=False)
    for i, (row, r) in enumerate(zip(grid, rounds), start=1):
        where = f"round {i}: {AXES[r.axis]} slice {r.index}"
        edit = "no prediction yet (cold start)" if r.edit_dice is None else f"edit Dice {r.edit_dice:.3f}"
        _show_slice(row[0], r.image, f"{where}\nprediction shown ({edit})")
        _overlay(row[0], r.shown, PREDICTION)
        _contour(row[0], r.truth)
        image = row[1].imshow(r.uncertainty, cmap="magma", vmin=0, vmax=float(np.log(2)), origin="lower", interpolation="nearest")
        row[1].set_title("uncertainty (entropy, nats)\n" + textwrap.fill(f"suggested: {r.reason}", 48), fontsize=6)
        row[1].set_axis_off()
        figure.colorbar(image, ax=row[1], shrink=0.7)
        _show_slice(row[2], r.image, f"correction: {r.voxels_changed} voxels changed\ngreen added, red removed")
        _overlay(row[2], r.truth & ~r.shown, ADDED, 0.7)
        _overlay(row[2], r.shown & ~r.truth, REMOVED, 0.7)
    figure.savefig(out / "rounds_overlay.png", dpi=DPI)
    return {"label": "demo_gm", "rounds": numbers, "figures": ["rounds_dice.png", "rounds_overlay.png"]}


# ---------------------------------------------------------------------- the page
def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


def _verdict(arms: Sequence[Mapping[str, Any]]) -> str:
    """One honest sentence per learned arm: does it beat the learning-free intensity band?"""
    band = next(a["dice"] for a in arms if a["name"] == "intensity band")
    lines = []
    for arm in arms:
        if arm["name"] != "intensity band":
            verb = "beats" if arm["dice"] > band + 0.005 else "does not beat"
            lines.append(f"<li>{html.escape(arm['name'])} {verb} the intensity band ({arm['dice']:.3f} vs {band:.3f}).</li>")
    return "<ul>" + "".join(lines) + "</ul>"


def _pretrain_section(pretrain: Mapping[str, Any]) -> str:
    final = pretrain["final"]
    tok, pre = final.get("tokenizer", {}), final.get("pretrain", {})
    rows = [
        ("tokenizer", "reconstruction PSNR (dB)", tok.get("psnr"), "patch mean", tok.get("psnr_patch_mean")),
        ("pretrain", "MAE loss on textured tokens", pre.get("mae_textured"), "predicting zero", pre.get("mae_floor_zero")),
    ]
    mim = (
        f"<p><b>MIM was switched off:</b> {html.escape(pretrain['mim_refused'].rstrip('.'))}. The backbone was pretrained with the MAE and scale objectives only.</p>"
        if pretrain["mim_refused"]
        else "<p>The tokenizer beat the patch-mean baseline, so the backbone was pretrained with MIM as well.</p>"
    )
    return f"""
<h2>2. Pretraining (tiny, CPU)</h2>
<p>The tiny SPAD-VT tokenizer, then the tiny SPAD-ViT (<code>spad_vit_test</code>) on patches streamed from the store
(bundled configs <code>tokenizer_tiny</code>, <code>pretrain_tiny</code>). Each diagnostic is drawn beside the trivial
predictor it has to beat; the table gives the mean of the last three logged values.</p>
{_table(["run", "diagnostic", "value", "trivial baseline", "baseline value"], rows)}
{mim}
{_img(pretrain["figure"], "pretraining losses and diagnostics")}
<p class="warn"><b>What this does not show.</b> A falling loss is not learning. This pretraining is a few hundred steps of
a 0.4 M-parameter model on three volumes: it exercises the pipeline, it does not learn image content. The frozen-feature
probe (<code>benchmarks/feature_probe.py</code>, README "Does pretraining learn?") finds the demo's features no better than a
no-learning intensity histogram on gray matter. The comparisons below (pretrained vs scratch, light head vs intensity band)
say the same in this run.</p>"""


def _fewshot_section(fewshot: Mapping[str, Any]) -> str:
    rows = [(a["name"], a["dice"], a["note"]) for a in fewshot["arms"]]
    return f"""
<h2>3. Few-shot segmentation of gray matter</h2>
<p>Target: {html.escape(fewshot["target"])} of <code>{fewshot["case"]}</code> (the MNI152 T1 at 1 mm). Labelled: axial
slices {fewshot["labelled"]}. Scored on {len(fewshot["heldout"])} held-out axial slices {fewshot["heldout"]} (none within
3 slices of a labelled one), Dice at probability 0.5 pooled over their voxels. Every arm sees the same labels.</p>
{_table(["method", "held-out Dice", "how"], rows)}
{_verdict(fewshot["arms"])}
{_img("fewshot_overlay.png", "few-shot predictions on a held-out slice")}
{_img("finetune_loss.png", "fine-tuning losses")}
<p><b>How to read it.</b> Gray matter thresholded at probability 0.5 is almost an intensity band on this T1 template
(PITFALLS 19), so the band, tuned on the labelled slices without any learning, is the bar a learned model has to clear.
The fine-tuned SPAD-UNETR from the pretrained backbone against the same network from random init shows what the demo's
pretraining adds; the light head fits in about a second on cached features and is what the annotation loop uses.</p>"""


def _rounds_section(rounds: Mapping[str, Any]) -> str:
    rows = [
        (i, AXES[r["axis"]], r["index"], r["reason"], r["edit_dice"], r["voxels_changed"], r["validation_dice"], r["heldout_dice"], r["band_dice"], r["refresh_s"])
        for i, r in enumerate(rounds["rounds"], start=1)
    ]
    return f"""
<h2>4. Simulated annotation rounds</h2>
<p><code>spadkit.active.AnnotationSession</code> on the same case, label map <code>{rounds["label"]}</code>. Each round the session
suggests a slice (any axis), shows its prediction, and a simulated annotator replaces that prediction with the truth; the
correction is saved as a new label version, the light head is refitted on every corrected slice, and the session re-predicts.
Held-out Dice: the same held-out axial slices as above, leaving out voxels that any correction reviewed (a coronal or
sagittal correction crosses them). The intensity band is re-tuned each round on exactly the voxels the corrections reviewed.</p>
{_table(["round", "axis", "slice", "why suggested", "edit Dice", "voxels changed", "validation Dice", "held-out Dice", "band Dice", "submit to refresh (s)"], rows)}
{_img("rounds_dice.png", "Dice per round")}
{_img("rounds_overlay.png", "prediction, uncertainty and correction per round")}
<p><b>How to read it.</b> Edit Dice compares the prediction the annotator saw with their correction (how much work the
round was); none in round 1, when there is no prediction yet. Validation Dice is the session's own signal on its validation
slices (every 4th correction is held back), so it appears from round 3. The corrections are perfect (the truth), unlike a
person's.</p>"""


def _steps_section(steps: Sequence[Mapping[str, Any]]) -> str:
    rows = [(s["step"], f"{s['wall_s']:.0f}", f"{s['cpu_s']:.0f}", f"{s['load_average']:.1f}") for s in steps]
    wall, cpu = sum(s["wall_s"] for s in steps), sum(s["cpu_s"] for s in steps)
    return f"""
<h2>Steps and times</h2>
{_table(["step", "wall (s)", "process CPU (s)", "load average at the end"], rows)}
<p>Total {wall:.0f} s wall, {cpu:.0f} s of process CPU on {os.cpu_count()} cores. Process CPU is the work done whatever
else runs on the machine; on 2 idle cores a step takes between half of it (both cores busy) and all of it (one thread).</p>"""


def write_report(out: Path, results: Mapping[str, Any], commands: Mapping[str, str]) -> Path:
    """Write ``out/results.json`` and ``out/report.html`` (figures already beside it); return the page."""
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    commands_html = "".join(f"<li>{html.escape(what)}: <code>{html.escape(cmd)}</code></li>" for what, cmd in commands.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>spadkit demo report</title>
<style>
body {{ font-family: sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em; line-height: 1.45; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
td, th {{ border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
img {{ max-width: 100%; }}
.warn {{ background: #fff4e0; padding: 0.6em; border-left: 4px solid #ffb000; }}
code {{ background: #f0f0f0; padding: 0 0.2em; }}
</style></head><body>
<h1>spadkit demo report</h1>
<p>Written {datetime.datetime.now().astimezone().isoformat(timespec="seconds")} by <code>spadkit demo</code>. Everything ran on
the CPU from data bundled with installed packages (nothing downloaded). Numbers: <a href="results.json">results.json</a>.</p>
{_steps_section(results["steps"])}
<h2>1. Data: ingest into a versioned OME-Zarr store</h2>
<p>nilearn's MNI152 T1 (1 mm) with its gray/white-matter map, the same template as a 1x1x3 mm LPS thick-slice volume, and
pydicom's CT slice (HU), ingested into <code>demo.zarr</code> at their own spacing (no resampling).</p>
{_img("montage.png", "the store's cases")}
{_pretrain_section(results["pretrain"])}
{_fewshot_section(results["fewshot"])}
{_rounds_section(results["rounds"])}
<h2>What this demo does not show</h2>
<ul>
<li>Generalisation: everything is one volume, an average brain (smooth, skull-stripped, left-right symmetric); the held-out
slices are other slices of the same volume, not other subjects or scanners.</li>
<li>That the pretraining learned anything (see section 2): on this target the intensity band is a strong baseline, and a
target that needs context (e.g. the ventricles, see <code>benchmarks/feature_probe.py</code>) is not part of the demo.</li>
<li>Real annotators: the simulated one corrects perfectly and instantly.</li>
<li>Speed on an idle machine: the times above were measured on whatever else the machine was doing (load average given).</li>
</ul>
<h2>Continue</h2>
<ul>{commands_html}</ul>
<p>napari opens the case with its labels: the ingested tissue map (<code>seg</code>) and the session's corrections
(<code>{results["rounds"]["label"]}</code>, one version per round). The annotation session resumes from the store
(<code>AnnotationSession.resume(store, "mni152_t1_1mm", label_name="{results["rounds"]["label"]}")</code>).</p>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
