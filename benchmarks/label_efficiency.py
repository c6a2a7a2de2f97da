"""Label efficiency: Dice against the number of labelled slices, for five annotator tools, on MNI152.

A simulated annotator labels ``k`` = 1, 2, 4, 8, 16 axial slices of the left
hemisphere of nilearn's MNI152 2009a T1 (only those slices are annotated: every
other voxel is unknown, never background), each tool learns from them, and Dice
is measured on the right hemisphere. Two targets, annotated together on the same
slices (classes 0 background, 1 gray matter, 2 ventricles):

* ``gm``: gray-matter probability > 0.5 (nearly an intensity band: a voxel-wise
  quadratic in intensity reaches Dice 0.94-0.96);
* ``ventricles``: the lateral ventricles (with the third), the largest cavity
  enclosed by tissue (:func:`spadkit.probe.ventricle_mask`). They are as dark as
  sulcal CSF and the brain's rim, so they need context.

Slices are drawn (per seed) from those whose left half holds at least
``min_positive_mm2`` of ventricle, so each labelled slice shows both targets;
where fewer exist than ``k``, all are labelled (``k_labelled`` says how many).

Arms (the same slices for every arm at a given seed):

* ``pretrained``: SPAD-UNETR with the ``--weights`` backbone, fine-tuned end to end;
* ``scratch``: the same network from random init;
* ``light_head``: the annotation loop's fast path, an MLP on frozen pretrained
  token features plus intensity features (:mod:`spadkit.models.light_head`);
* ``monai_unet``: MONAI's residual UNet from scratch;
* ``random_forest``: ilastik's recipe, a random forest on a multi-scale filter
  bank (:mod:`spadkit.baselines`).

Grids: the 1 mm template block-averaged to 2x2x2 mm, and its 1x1x3 mm
thick-slice copy (3 slices averaged, as ``spadkit demo`` stores it); targets are
the majority of their 1 mm voxels. Each grid is cropped to the head's bounding
box, and every arm trains and is scored on that grid.

Metrics, on head voxels of the right hemisphere: ``dice`` over all its slices
(the issue's protocol). The 2009 template is left-right symmetric (PITFALLS 19),
so the right half of a labelled slice is the mirror image of its labelled left
half, and the random forest's features are mirror-invariant: ``dice_unlabelled``
leaves the labelled slices out (``None`` where no target voxel remains).

Run: ``python benchmarks/label_efficiency.py --weights DIR --out FILE.json``
(``--quick``: a one-minute smoke run on a 4 mm grid). Writes the JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from _label_networks import (
    PatchSampler,
    TrainSettings,
    monai_unet,
    multiple_of,
    pad_to,
    spad_unetr,
    train_and_predict,
)

from spadkit.atomic import atomic_path
from spadkit.baselines import filter_bank, fit_random_forest, predict_random_forest
from spadkit.models import create_model, load_pretrained
from spadkit.models.light_head import extract_features, fit_light_head, predict_light_head
from spadkit.probe import choose_slices, mni152_probe_volume

ARMS = ("pretrained", "scratch", "light_head", "monai_unet", "random_forest")
#: the default run order: cheap arms first, so a stopped run has the baselines
RUN_ORDER = ("random_forest", "light_head", "pretrained", "scratch", "monai_unet")
#: class index of each target in the joint label map
TARGETS = {"gm": 1, "ventricles": 2}
NETWORKS = ("pretrained", "scratch", "monai_unet")


@dataclasses.dataclass(frozen=True)
class Case:
    """One grid of the template, cropped to the head.

    Attributes:
        name: ``"XxYxZ"`` spacing in mm (in-plane first, as scanners state it).
        image: ``(Z, Y, X)`` float32 in [0, 1].
        labels: ``(Z, Y, X)`` uint8, 0 background and :data:`TARGETS`.
        head: ``(Z, Y, X)`` bool, the voxels scored (the template is zero outside the brain).
        spacing: ``(Z, Y, X)`` mm.
        midline: first X index of the right hemisphere.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    head: np.ndarray
    spacing: tuple[float, float, float]
    midline: int

    def side(self, right: bool) -> np.ndarray:
        """``(Z, Y, X)`` bool: head voxels of one hemisphere."""
        mask = np.zeros(self.image.shape, bool)
        mask[..., self.midline :] = right
        mask[..., : self.midline] = not right
        return mask & self.head


def parse_spacing(spec: str) -> tuple[int, int, int]:
    """``"2x2x2"`` / ``"1x1x3"`` (x, y, z mm, integers) -> block factors ``(z, y, x)`` of the 1 mm template."""
    try:
        x, y, z = (int(v) for v in spec.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"spacing {spec!r} is not XxYxZ in whole mm, e.g. 2x2x2 or 1x1x3"
        ) from None
    return z, y, x


def block_mean(array: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over ``factors`` blocks of a ``(Z, Y, X)`` array (trailing remainders dropped)."""
    shape = [n // f for n, f in zip(array.shape, factors)]
    trimmed = array[tuple(slice(0, n * f) for n, f in zip(shape, factors))].astype(np.float32)
    return trimmed.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2]).mean(
        axis=(1, 3, 5)
    )


def build_case(spec: str, margin_mm: int = 4) -> Case:
    """The template on the ``spec`` grid (see the module docstring), cropped to the head plus ``margin_mm``."""
    factors = parse_spacing(spec)
    volume = mni152_probe_volume(1)
    lo = [
        max(
            int(np.flatnonzero(volume.region.any(axis=tuple(b for b in range(3) if b != a)))[0])
            - margin_mm,
            0,
        )
        for a in range(3)
    ]
    lo[2] = volume.midline - factors[2] * (
        (volume.midline - lo[2]) // factors[2]
    )  # the midline falls on a block edge
    box = tuple(slice(start, None) for start in lo)
    coarse = {name: block_mean(mask[box], factors) > 0.5 for name, mask in volume.targets.items()}
    labels = np.zeros(coarse["gm"].shape, np.uint8)
    for name, value in TARGETS.items():
        labels[coarse[name]] = value
    head = block_mean(volume.region[box], factors) > 0.5
    keep = tuple(
        slice(
            0,
            int(np.flatnonzero(head.any(axis=tuple(b for b in range(3) if b != a)))[-1])
            + 1
            + margin_mm // f,
        )
        for a, f in enumerate(factors)
    )
    spacing = tuple(float(f) for f in factors)
    return Case(
        spec,
        block_mean(volume.image[box], factors)[keep],
        labels[keep],
        head[keep],
        spacing,
        (volume.midline - lo[2]) // factors[2],
    )


def dice(pred: np.ndarray, target: np.ndarray) -> float | None:
    """Foreground Dice of two bool arrays; ``None`` when both are empty."""
    total = int(pred.sum() + target.sum())
    return 2 * float((pred & target).sum()) / total if total else None


class Arms:
    """Fits and predicts every arm on one :class:`Case`; per-case features are computed once and timed."""

    def __init__(self, case: Case, weights: str | None, train: TrainSettings, model: str):
        self.case, self.weights, self.train, self.model = case, weights, train, model
        self.multiple = multiple_of(case.spacing, case.image.shape[0], pyramid=8)
        self.setup_seconds: dict[str, float] = {}
        self._cache: dict[str, object] = {}

    def _cached(self, arm: str, build):
        if arm not in self._cache:
            start = time.perf_counter()
            self._cache[arm] = build()
            self.setup_seconds[arm] = round(time.perf_counter() - start, 2)
        return self._cache[arm]

    def predict(
        self, arm: str, labels: np.ndarray, annotated: np.ndarray, slices: list[int], seed: int
    ) -> tuple[np.ndarray, float, float]:
        """``(Z, Y, X)`` predicted classes of ``arm`` trained on ``labels`` where ``annotated``; fit and predict seconds."""
        case = self.case
        if arm == "random_forest":
            bank = self._cached(arm, lambda: filter_bank(case.image, case.spacing))
            start = time.perf_counter()
            forest = fit_random_forest(
                bank, labels, annotated, seed=seed, n_jobs=torch.get_num_threads()
            )
            fitted = time.perf_counter()
            right = np.argwhere(case.side(right=True))
            classes = np.zeros(case.image.shape, np.uint8)
            classes[tuple(right.T)] = predict_random_forest(forest, bank, right).argmax(1)
            return classes, fitted - start, time.perf_counter() - fitted
        if arm == "light_head":
            backbone = create_model(self.model, pretrained=self.weights)
            features = self._cached(
                arm, lambda: extract_features(backbone, case.image[None], case.spacing)
            )
            start = time.perf_counter()
            head = fit_light_head(
                features, labels, annotated, num_classes=len(TARGETS) + 1, seed=seed
            )
            fitted = time.perf_counter()
            return (
                predict_light_head(head, features).argmax(0).numpy(),
                fitted - start,
                time.perf_counter() - fitted,
            )
        if arm == "monai_unet":
            net, groups = monai_unet(len(TARGETS) + 1, seed)
            forward = lambda m, x: m(x)  # noqa: E731
        else:
            net, groups = spad_unetr(
                self.model.replace("vit", "unetr"),
                self.weights if arm == "pretrained" else None,
                len(TARGETS) + 1,
                seed,
                self.train.layer_decay,
            )
            spacing = torch.tensor(case.spacing)
            forward = lambda m, x: m(x, spacing)  # noqa: E731
        padded = [pad_to(a, self.multiple) for a in (case.image, labels, annotated)]
        patch = [
            max(m, m * round(mm / s / m))
            for mm, s, m in zip(self.train.patch_mm, case.spacing, self.multiple)
        ]
        patch = [min(p, n) for p, n in zip(patch, padded[0].shape)]
        sampler = PatchSampler(*padded, slices, patch, seed)
        classes, fit_s, predict_s = train_and_predict(
            net, forward, groups, sampler, torch.from_numpy(padded[0])[None, None], self.train
        )
        return classes[tuple(slice(0, n) for n in case.image.shape)], fit_s, predict_s


def run_case(
    case: Case,
    arms: list[str],
    ks: list[int],
    seeds: list[int],
    args: argparse.Namespace,
    train: TrainSettings,
) -> Iterator[tuple[list[dict], dict]]:
    """Rows of one grid, arm by arm: yields each arm's rows with the grid's summary so far."""
    left, right = case.side(right=False), case.side(right=True)
    min_positive = max(1, round(args.min_positive_mm2 / (case.spacing[1] * case.spacing[2])))
    runner = Arms(case, args.weights, train, args.model)
    right_chance = {t: float((case.labels[right] == TARGETS[t]).mean()) for t in args.targets}
    info = {"shape": list(case.image.shape), "spacing_zyx_mm": list(case.spacing), "midline_x": case.midline, "min_positive_voxels": min_positive,
            "target_voxels": {t: int((case.labels == TARGETS[t]).sum()) for t in args.targets},
            "chance_dice_all_head": {t: round(2 * p / (1 + p), 4) for t, p in right_chance.items()}, "seconds_per_arm": {}}  # fmt: skip
    for arm in arms:
        rows, cpu_start = [], time.process_time()
        fit_total = predict_total = 0.0
        for k in ks:
            for seed in seeds:
                slices = choose_slices(
                    (case.labels == TARGETS["ventricles"]) & left, k, seed, min_positive
                )
                annotated = np.zeros(case.image.shape, bool)
                annotated[slices] = True
                annotated &= left
                labels = case.labels.copy()
                if args.shuffle_labels:  # control: the labels no longer depend on the image
                    labels[annotated] = np.random.default_rng(seed).permutation(labels[annotated])
                classes, fit_s, predict_s = runner.predict(arm, labels, annotated, slices, seed)
                fit_total, predict_total = fit_total + fit_s, predict_total + predict_s
                unlabelled = right.copy()
                unlabelled[slices] = False
                for target in args.targets:
                    value = TARGETS[target]
                    truth, pred = case.labels == value, classes == value
                    rows.append({
                        "target": target, "arm": arm, "spacing": case.name, "k": k, "seed": seed,
                        "dice": dice(pred[right], truth[right]),
                        "dice_unlabelled": dice(pred[unlabelled], truth[unlabelled]) if truth[unlabelled].any() else None,
                        "k_labelled": len(slices), "slices": slices, "train_seconds": round(fit_s, 2),
                    })  # fmt: skip
                print(
                    f"{case.name} {arm} k={k} seed={seed}: "
                    + ", ".join(
                        f"{r['target']} {r['dice']:.3f}" for r in rows[-len(args.targets) :]
                    )
                    + f" ({fit_s:.1f} s)",
                    flush=True,
                )
        info["seconds_per_arm"][arm] = {
            "setup": runner.setup_seconds.get(arm, 0.0),
            "fit": round(fit_total, 1),
            "predict": round(predict_total, 1),
            "cpu_all_threads": round(time.process_time() - cpu_start, 1),
        }
        yield rows, info


def plot(runs: list[dict], path: Path, cases: dict) -> Path:
    """Dice against k: a column per target and spacing, a row per metric; mean over seeds, band min..max,
    dashed gray: marking every head voxel of the hemisphere."""
    from matplotlib.figure import Figure

    columns = sorted({(r["target"], r["spacing"]) for r in runs})
    metrics = ("dice", "dice_unlabelled")
    figure = Figure(figsize=(3.6 * len(columns), 3.1 * len(metrics)), layout="constrained")
    axes = figure.subplots(len(metrics), len(columns), squeeze=False)
    for row, metric in zip(axes, metrics):
        for ax, (target, spacing) in zip(row, columns):
            for arm in ARMS:
                rows = [
                    r
                    for r in runs
                    if (r["target"], r["spacing"], r["arm"]) == (target, spacing, arm)
                    and r[metric] is not None
                ]
                ks = sorted({r["k"] for r in rows})
                if not ks:
                    continue
                values = [[r[metric] for r in rows if r["k"] == k] for k in ks]
                (line,) = ax.plot(
                    ks,
                    [np.mean(v) for v in values],
                    marker="o",
                    label=arm,
                    color=f"C{ARMS.index(arm)}",
                )
                ax.fill_between(
                    ks,
                    [min(v) for v in values],
                    [max(v) for v in values],
                    color=line.get_color(),
                    alpha=0.15,
                )
            ax.axhline(
                cases[spacing]["chance_dice_all_head"][target],
                color="gray",
                linestyle="--",
                linewidth=0.8,
            )
            ks = sorted({r["k"] for r in runs})
            ax.set(
                xscale="log",
                xticks=ks,
                xticklabels=[str(k) for k in ks],
                ylim=(0, 1),
                xlabel="labelled axial slices k",
                ylabel=metric,
                title=f"{target}, {spacing} mm",
            )
    axes[0, 0].legend(fontsize=7)
    figure.suptitle(
        "label efficiency on MNI152 (train: left hemisphere of k slices; score: right hemisphere)",
        fontsize=9,
    )
    figure.savefig(path, dpi=100)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--quick`` expanded into its settings)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--weights",
        help="pretrained backbone folder (save_pretrained); without it the pretrained and light_head arms are skipped",
    )
    parser.add_argument(
        "--model", default="spad_vit_test", help="backbone architecture when --weights is absent"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/label_efficiency.json")
    )
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(RUN_ORDER))
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument(
        "--spacings",
        nargs="+",
        default=["2x2x2", "1x1x3"],
        help="grids as XxYxZ mm block factors of the 1 mm template",
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--steps",
        type=int,
        default=TrainSettings.steps,
        help="optimiser steps of every network arm",
    )
    parser.add_argument(
        "--min-positive-mm2",
        type=float,
        default=20.0,
        help="ventricle area a labelled slice's left half must show",
    )
    parser.add_argument(
        "--shuffle-labels",
        action="store_true",
        help="control: permute labels among the annotated voxels (every arm must fall to chance)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 4x4x4 mm grid, k 1 and 4, one seed, ventricles, 3 steps (explicit options win)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch (and forest) threads; 1 on a shared machine: at load ~8 on 2 cores, 2 threads made every step 7-17x slower",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of --out that this run does not redo (another arm, grid, k or seed)",
    )
    if parser.parse_known_args(argv)[0].quick:  # defaults only: explicit options win
        parser.set_defaults(
            spacings=["4x4x4"], ks=[1, 4], seeds=[0], targets=["ventricles"], steps=3
        )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_pretrained(args.weights)[1] if args.weights else None
    args.model = cfg.architecture if cfg else args.model
    arms = [a for a in args.arms if args.weights or a not in ("pretrained", "light_head")]
    train = TrainSettings(steps=args.steps)

    kept, cases = previous_rows(args, arms) if args.merge else ([], {})
    runs, started = list(kept), time.perf_counter()
    for spec in args.spacings:
        for rows, info in run_case(build_case(spec), arms, args.ks, args.seeds, args, train):
            runs += rows
            cases[spec] = merge_grid(cases.get(spec), info)
            result = {
                "runs": runs,
                "settings": settings(args, cfg, train, cases, time.perf_counter() - started)
                | {
                    "ks": sorted({r["k"] for r in runs}),
                    "seeds": sorted({r["seed"] for r in runs}),
                },
            }
            with atomic_path(
                args.out
            ) as tmp:  # after every arm: a stopped run keeps what it finished
                Path(tmp).write_text(json.dumps(result, indent=1))
            plot(runs, args.out.with_suffix(".png"), cases)
    return result


def previous_rows(args: argparse.Namespace, arms: list[str]) -> tuple[list[dict], dict]:
    """The rows and grids of ``--out`` that this run does not redo, for ``--merge``.

    Raises:
        SystemExit: when the earlier run trained its networks another way (the rows would not compare).
    """
    if not args.out.exists():
        return [], {}
    earlier = json.loads(args.out.read_text())
    if earlier["settings"]["train"]["steps"] != args.steps or earlier["settings"]["weights"] != (
        os.fspath(args.weights) if args.weights else None
    ):
        raise SystemExit(
            f"{args.out}: its runs used other --steps or --weights; --merge only joins runs of one configuration"
        )
    redo = {
        (a, s, k, seed) for a in arms for s in args.spacings for k in args.ks for seed in args.seeds
    }
    rows = [r for r in earlier["runs"] if (r["arm"], r["spacing"], r["k"], r["seed"]) not in redo]
    return rows, earlier["settings"]["grids"]


def merge_grid(earlier: dict | None, info: dict) -> dict:
    """A grid's summary after this run: its timings per arm joined to those of the earlier run."""
    if earlier is None:
        return info
    return info | {"seconds_per_arm": earlier["seconds_per_arm"] | info["seconds_per_arm"]}


def settings(
    args: argparse.Namespace, cfg, train: TrainSettings, cases: dict, seconds: float
) -> dict:
    """The ``settings`` block of the JSON: what was run, on what, how, and how long it took."""
    return {
        "weights": os.fspath(args.weights) if args.weights else None,
        "backbone": args.model,
        "provenance": cfg.provenance if cfg else None,
        "networks": {
            "pretrained/scratch": args.model.replace("vit", "unetr"),
            "monai_unet": "monai.networks.nets.UNet(channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1)",
        },
        "volume": "nilearn MNI152 2009a sym T1 (1 mm), block-averaged to each grid and cropped to the head's bounding box",
        "grids": cases,
        "targets": {
            "gm": "gray-matter probability > 0.5 (majority of 1 mm voxels)",
            "ventricles": "largest tissue-enclosed cavity (spadkit.probe.ventricle_mask), majority of 1 mm voxels",
        },
        "annotation": f"k axial slices with >= {args.min_positive_mm2} mm2 of ventricle in the left half, both targets labelled on the head voxels of their left halves",
        "dice": "head voxels of the right hemisphere, all slices; dice_unlabelled: without the labelled slices (the symmetric template mirrors them)",
        "train": dataclasses.asdict(train)
        | {
            "loss": "masked Dice + CE on annotated voxels",
            "optimiser": "AdamW, warm-up + cosine; layer decay for the pretrained backbone",
        },
        "light_head": "spadkit.models.light_head: 32 PCA token features + 4 intensity features, MLP (32 hidden), 100 full-batch Adam steps, 5000 voxels",
        "random_forest": "spadkit.baselines: 31 filters (intensity; Gaussian, gradient magnitude, LoG, 3 Hessian eigenvalues at 0.7, 1.6, 3.5, 5, 10 mm), 100 trees, balanced classes, 20000 voxels",
        "shuffle_labels": args.shuffle_labels,
        "ks": args.ks,
        "seeds": args.seeds,
        "threads": args.threads,
        "total_seconds": round(seconds, 1),
    }


if __name__ == "__main__":
    main()
