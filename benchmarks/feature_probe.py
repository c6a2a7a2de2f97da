"""Frozen-feature probe of a SPAD-ViT on MNI152: does pretraining beat random init and no-learning controls?

A logistic-regression probe on frozen token features (``spadkit.probe``) is fitted on
``k`` = 1, 4, 16 labelled axial slices of the left hemisphere of nilearn's MNI152 T1
(1 mm) and scored on the right hemisphere, for two targets:

* ``gm``: gray-matter probability > 0.5 (almost an intensity band);
* ``ventricles``: the largest cavity enclosed by tissue (GM + WM probability >= 0.5):
  the lateral ventricles, whose intensity band they share with sulcal CSF and
  the brain's rim, so an intensity rule cannot find them.

Arms (one row per target, ``k``, seed and evaluation volume):

* ``pretrained``: the backbone loaded from ``--weights`` (seeds pick the slices);
* ``random``: the same architecture at random init, seed ``s`` for init and slices;
* ``histogram``: a 16-bin intensity histogram of each token's voxels (no learning);
* ``intensity``: a voxel-wise logistic regression on ``(i, i**2)``;
* ``ceiling``: the fraction of each feature cell inside the target (features that
  hold the answer): the best any feature of that resolution can give this probe.

Voxels: the head (nilearn's template is zero outside the brain); ``settings.chance``
gives each target's prevalence there (the AP of a random ranking) and the Dice of
marking every voxel.

Evaluation volumes: ``transductive`` is the right hemisphere of the very volume the
probe was fitted on, which the demo's pretraining also saw (and the template is
left-right symmetric): the annotation-session setting, not generalisation.
``heldout`` is the right hemisphere of a contrast-randomised, noisy, shifted copy
that no pretraining saw (``spadkit.probe.heldout_copy``).

``dice_thr`` uses the threshold that maximises Dice on the labelled training
voxels; ``dice_oracle`` the best threshold on the evaluation voxels (an oracle);
``ap`` is average precision. Writes ``--out`` (JSON) and a PNG beside it.

Run: ``python benchmarks/feature_probe.py --weights DIR --out results/feature_probe.json``
(without ``--weights`` only the random and control arms run).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from spadkit.models import create_model, load_pretrained
from spadkit.probe import (
    ProbeSettings,
    backbone_features,
    heldout_copy,
    hemisphere,
    histogram_features,
    mni152_probe_volume,
    run_probe,
    target_features,
)

ARMS = ("pretrained", "random", "histogram", "intensity", "ceiling")


def value_range_of(intensity_rule: str) -> tuple[float, float]:
    """The scaled intensity range a ``PretrainedCfg.intensity`` text names ([-1, 1] or [0, 1])."""
    return (-1.0, 1.0) if "[-1, 1]" in intensity_rule else (0.0, 1.0)


def plot(runs: list[dict], path: Path, chance: dict | None = None) -> Path:
    """Dice at the training threshold and AP against k: one panel per target, evaluation and metric
    (dashed: chance, i.e. marking every voxel for Dice, the prevalence for AP)."""
    from matplotlib.figure import Figure

    targets = sorted({r["target"] for r in runs})
    evals = sorted({r["eval"] for r in runs}, reverse=True)
    panels = [(t, e, m) for t in targets for m in ("dice_thr", "ap") for e in evals]
    figure = Figure(figsize=(3.4 * len(evals) * 2, 3.0 * len(targets)), layout="constrained")
    axes = figure.subplots(len(targets), 2 * len(evals), squeeze=False).ravel()
    for ax, (target, evaluation, metric) in zip(axes, panels):
        for arm in ARMS:
            rows = [r for r in runs if r["target"] == target and r["eval"] == evaluation and r["arm"] == arm]
            if not rows:
                continue
            ks = sorted({r["k"] for r in rows})
            values = [[r[metric] for r in rows if r["k"] == k] for k in ks]
            mean = [np.mean(v) for v in values]
            (line,) = ax.plot(ks, mean, marker="o", label=arm)
            ax.fill_between(ks, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
        if chance:
            ax.axhline(chance[evaluation][target]["dice_all" if metric == "dice_thr" else "ap"], color="gray", linestyle="--", linewidth=0.8)
        ax.set(xscale="log", xticks=ks, xticklabels=[str(k) for k in ks], xlabel="labelled slices k", ylabel=metric, title=f"{target}, {evaluation}")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    figure.suptitle("frozen-feature probe on MNI152 (mean, band = min..max over seeds)", fontsize=9)
    figure.savefig(path, dpi=100)
    return path


def chance_levels(volumes: dict) -> dict[str, dict[str, dict[str, float]]]:
    """Per evaluation volume and target: prevalence in the evaluation voxels and the Dice of marking them all."""
    out = {}
    for name, volume in volumes.items():
        right = hemisphere(volume, right=True)
        out[name] = {}
        for target, mask in volume.targets.items():
            p = float(mask[right].mean())
            out[name][target] = {"ap": round(p, 4), "dice_all": round(2 * p / (1 + p), 4)}
    return out


def summary(runs: list[dict]) -> dict[str, dict[str, float]]:
    """``"target/eval/arm/k" -> {dice_thr, ap}`` means and seed spreads (max - min)."""
    out = {}
    for key in sorted({(r["target"], r["eval"], r["arm"], r["k"]) for r in runs}):
        rows = [r for r in runs if (r["target"], r["eval"], r["arm"], r["k"]) == key]
        out["/".join(map(str, key))] = {
            f"{metric}_{stat}": round(float(fn([r[metric] for r in rows])), 4)
            for metric in ("dice_thr", "ap")
            for stat, fn in (("mean", np.mean), ("spread", np.ptp))
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, help="folder written by save_pretrained (model.pt + pretrained_cfg.json)")
    parser.add_argument("--model", help="architecture for the random arm without --weights (default spad_vit_test)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/feature_probe.json"))
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--block", type=int, default=-1, help="block whose normed output is probed")
    parser.add_argument("--window", type=int, nargs=3, help="tokens per forward (z y x); default the whole volume")
    parser.add_argument("--shifts", type=int, default=2, help="token-grid subdivisions per axis (shifted forwards)")
    parser.add_argument("--downsample", type=int, default=1, help="keep every n-th voxel (tests and quick runs)")
    parser.add_argument("--eval-stride", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = load_pretrained(args.weights)[1] if args.weights else None
    name = cfg.architecture if cfg else (args.model or "spad_vit_test")
    value_range = value_range_of(cfg.intensity) if cfg else (0.0, 1.0)
    settings = ProbeSettings(ks=tuple(args.ks), seeds=tuple(args.seeds), eval_stride=args.eval_stride)
    volume = mni152_probe_volume(args.downsample, value_range)
    volumes = {"transductive": volume, "heldout": heldout_copy(volume)}

    def backbone(model: torch.nn.Module) -> object:
        return backbone_features(model, args.block, args.window, args.shifts)

    def random_model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return create_model(name)

    arms = {
        "pretrained": lambda: backbone(create_model(name, pretrained=args.weights)),
        "random": lambda: [backbone(random_model(seed)) for seed in settings.seeds],
        "histogram": lambda: histogram_features(shifts=args.shifts),
        "intensity": lambda: None,
    }
    step = 16 // args.shifts
    if not args.weights and "pretrained" in args.arms:
        args.arms.remove("pretrained")
    runs, seconds, cpu_seconds = [], {}, {}
    for arm in args.arms:
        start, cpu_start = time.perf_counter(), time.process_time()
        if arm == "ceiling":  # one feature map per target
            for target in ("gm", "ventricles"):
                runs += run_probe({arm: target_features(target, step)}, volumes, settings, targets=(target,))
        else:
            runs += run_probe({arm: arms[arm]()}, volumes, settings)
        seconds[arm] = round(time.perf_counter() - start, 1)
        cpu_seconds[arm] = round(time.process_time() - cpu_start, 1)
        print(f"{arm}: {seconds[arm]} s wall, {cpu_seconds[arm]} s CPU", flush=True)
    result = {
        "runs": runs,
        "summary": summary(runs),
        "settings": {
            "model": name,
            "weights": os.fspath(args.weights) if args.weights else None,
            "provenance": cfg.provenance if cfg else None,
            "volume": f"nilearn MNI152 2009a sym T1, shape {volume.image.shape}, spacing {volume.spacing} mm, midline x={volume.midline}",
            "intensity": f"0.5-99.5 foreground percentiles -> {list(value_range)}",
            "targets": {
                "gm": "gray-matter probability > 0.5",
                "ventricles": "largest 6-connected cavity of voxels with GM+WM probability < 0.5 enclosed by tissue (scipy binary_fill_holes)",
            },
            "target_voxels": {k: int(v.sum()) for k, v in volume.targets.items()},
            "chance": chance_levels(volumes),
            "train": f"k axial slices (left hemisphere, x < midline, head voxels) with >= {settings.min_positive} target voxels; {settings.max_train_voxels} voxels subsampled",
            "eval": {"transductive": "head voxels of the right hemisphere of the same volume (pretraining also saw it; symmetric template)", "heldout": "right hemisphere of heldout_copy (gamma 0.75, bias field, noise 0.03, shift 5,7,3 voxels)"},
            "features": f"normed output of block {args.block}; window {args.window or 'whole volume'}; {args.shifts}x{args.shifts}x{args.shifts} shifted forwards; trilinear upsampling",
            "probe": f"sklearn LogisticRegression(C={settings.regularisation}) on standardised features",
            "dice_thr": "threshold maximising Dice on the training voxels; dice_oracle: best threshold on the evaluation voxels",
            "eval_stride": settings.eval_stride,
            "ks": list(settings.ks),
            "seeds": list(settings.seeds),
            "seconds_per_arm": seconds,
            "cpu_seconds_per_arm": cpu_seconds,  # all threads; on a shared machine wall time overstates the cost
            "threads": args.threads,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(runs, args.out.with_suffix(".png"), result["settings"]["chance"])
    for key, value in result["summary"].items():
        print(key, value)
    return result


if __name__ == "__main__":
    main()
