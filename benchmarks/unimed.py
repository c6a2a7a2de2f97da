"""UniMed one-stage joint pretraining vs MAE-only pretraining (same steps, batch and crops) vs random
init: few-shot Dice on MNI152 afterwards.

Pretraining data: ``--copies`` contrast-randomised copies per annotation level of nilearn's MNI152
2009a T1 on the 2x2x2 mm grid of the label-efficiency benchmark (gamma, smooth bias field,
Rician-like noise and a small shift, :func:`spadkit.probe.heldout_copy`), classes 0 background,
1 gray matter, 2 ventricles:

* ``mask``: the gray-matter and ventricle masks;
* ``box``: the bounding boxes of the ventricles' connected components (class 2, exhaustive);
* ``class``: image-level records of slabs: a slab above the ventricles (gray matter present,
  ventricles absent) or around them (both present);
* ``none``: no labels.

Every pretraining crop lies in the LEFT hemisphere: no pretraining step sees the right one. The
MAE arm (:class:`~spadkit.tasks.MAEPretrain`) and the UniMed arm (:class:`~spadkit.tasks.UniMedPretrain`)
start from the same initial weights and train on the same batch sequence with the same MAE masks;
the only difference is UniMed's composed supervised loss (and its decoder's extra compute: a
second, unmasked forward per step). ``random`` is the same initial backbone untrained.

Evaluation: :mod:`label_efficiency`'s arms, imported: ``light_head`` (the annotation loop's fast
path: an MLP on the frozen backbone's features) and optionally ``pretrained`` (SPAD-UNETR on the
backbone, fine-tuned), trained on ``k`` axial slices of the left hemisphere of the ORIGINAL T1 and
scored (Dice) on its right hemisphere. The 2009 template is left-right symmetric (PITFALLS 19) and
all copies share its anatomy, so this measures whether the supervision in pretraining makes the
features more useful for the same structures seen in another contrast; it is not a
held-out-subject test.

Run: ``python benchmarks/unimed.py --arms light_head pretrained`` (221 s on a quiet 2-core machine
with 1 thread; an earlier run with 2 threads at load ~8 took 28 min; UniMed's pretraining is ~7x
MAE's time per step; ``--quick`` ~1 min). Writes
``benchmarks/results/unimed.json`` (``{"runs": [...], "settings": {...}}``) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from _label_networks import TrainSettings
from label_efficiency import TARGETS, Case, build_case, run_case
from scipy import ndimage

from spadkit.atomic import atomic_path
from spadkit.models import PretrainedCfg, create_model, save_pretrained
from spadkit.probe import ProbeVolume, heldout_copy
from spadkit.tasks import MAEPretrain, UniMedPretrain

LEVELS = ("mask", "box", "class", "none")
PRETRAININGS = ("unimed", "mae", "random")
#: classes of the joint label map: 0 background, then label_efficiency's targets
NUM_CLASSES = 1 + len(TARGETS)
VENTRICLES = TARGETS["ventricles"]


@dataclasses.dataclass(frozen=True)
class PretrainCase:
    """One pretraining image with the annotation of one level.

    Attributes:
        level: one of :data:`LEVELS`.
        image: ``(Z, Y, X)`` float32 in [0, 1]; labels: ``(Z, Y, X)`` uint8 (used only for ``mask``).
        boxes: ``(N, 7)`` ``[class, z0, y0, x0, z1, y1, x1]`` case voxels (``box``).
        present, absent: image-level classes (``class``).
        midline: first X index of the right hemisphere (crops stay left of it).
    """

    level: str
    image: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    present: tuple[int, ...]
    absent: tuple[int, ...]
    midline: int


def ventricle_boxes(labels: np.ndarray, midline: int) -> np.ndarray:
    """Boxes ``(N, 7)`` of the ventricles' 26-connected components in the left hemisphere."""
    left = (labels == VENTRICLES) & (np.arange(labels.shape[2]) < midline)
    components, _ = ndimage.label(left, structure=np.ones((3, 3, 3)))
    return np.array([[VENTRICLES, *(s.start for s in box), *(s.stop for s in box)] for box in ndimage.find_objects(components)], np.float32).reshape(-1, 7)


def pretraining_cases(case: Case, copies: int, seed: int) -> list[PretrainCase]:
    """``copies`` contrast-randomised copies of ``case`` per level of :data:`LEVELS` (see the module docstring)."""
    volume = ProbeVolume(case.image, {"labels": case.labels}, case.spacing, case.midline, case.head)
    rng = np.random.default_rng([seed, 5])
    out = []
    for i, level in enumerate(level for level in LEVELS for _ in range(copies)):
        copy = heldout_copy(volume, seed=seed * 1000 + i, shift=tuple(int(s) for s in rng.integers(0, 4, 3)), gamma=float(rng.uniform(0.6, 1.5)))
        image, labels, midline = copy.image, copy.targets["labels"], copy.midline
        present: tuple[int, ...] = ()
        absent: tuple[int, ...] = ()
        if level == "class":  # a slab above the ventricles (they are absent), or one around them
            z = np.flatnonzero((labels == VENTRICLES).any(axis=(1, 2)))
            slab = slice(z[-1] + 1, None) if i % 2 == 0 else slice(max(0, z[0] - 4), z[-1] + 5)
            image, labels = image[slab], labels[slab]
            present = tuple(sorted(int(c) for c in np.unique(labels) if c))
            absent = tuple(c for c in range(1, NUM_CLASSES) if c not in present)
        boxes = ventricle_boxes(labels, midline) if level == "box" else np.zeros((0, 7), np.float32)
        out.append(PretrainCase(level, image, labels, boxes, present, absent, midline))
    return out


class JointBatches(torch.utils.data.IterableDataset):
    """``steps`` joint batches (the keys of ``PatchStream(joint_classes=K)``) of left-hemisphere crops,
    the same sequence on every iteration (seeded); crops of box cases overlap a box with probability 0.5.

    Crops reaching past a case's edge are zero-padded (the template's outside value) and read as
    unannotated there.
    """

    def __init__(self, cases: list[PretrainCase], steps: int, batch: int, patch: tuple[int, int, int], spacing: tuple[float, float, float], seed: int):
        self.cases, self.steps, self.batch, self.patch, self.spacing, self.seed = cases, steps, batch, patch, spacing, seed

    def _origin(self, case: PretrainCase, rng: np.random.Generator) -> np.ndarray:
        limit = np.array([case.image.shape[0], case.image.shape[1], case.midline]) - np.array(self.patch)
        if len(case.boxes) and rng.random() < 0.5:
            box = case.boxes[rng.integers(len(case.boxes))]
            centre = (box[1:4] + box[4:7]) / 2
            return np.clip(np.round(centre - np.array(self.patch) / 2).astype(int), 0, np.maximum(limit, 0))
        return np.array([rng.integers(max(n, 0) + 1) for n in limit])

    def sample(self, case: PretrainCase, rng: np.random.Generator) -> dict:
        """One crop of ``case`` with its targets in the crop's voxels."""
        origin = self._origin(case, rng)
        box = tuple(slice(o, o + p) for o, p in zip(origin, self.patch))
        crop = case.image[box]
        pad = [(0, p - n) for p, n in zip(self.patch, crop.shape)]
        annotated = np.pad(np.ones(crop.shape, bool), pad) if case.level == "mask" else np.zeros(self.patch, bool)
        boxes = case.boxes.copy()
        boxes[:, 1:4] -= origin
        boxes[:, 4:7] -= origin
        boxes[:, 1:] = np.clip(boxes[:, 1:], 0, np.tile(self.patch, 2))
        boxes = boxes[(boxes[:, 4:7] > boxes[:, 1:4]).all(1)]
        classes = np.full(NUM_CLASSES, -1, np.int8)
        classes[list(case.present)], classes[list(case.absent)] = 1, 0
        return {
            "image": torch.from_numpy(np.pad(crop, pad))[None],
            "label": torch.from_numpy(np.pad(case.labels[box], pad).astype(np.int64))[None],
            "annotated": torch.from_numpy(annotated)[None],
            "boxes": torch.from_numpy(boxes),
            "box_known": torch.tensor([case.level == "box" and c == VENTRICLES for c in range(NUM_CLASSES)]),
            "image_classes": torch.from_numpy(classes),
        }

    def __iter__(self) -> Iterator[dict]:
        rng = np.random.default_rng([self.seed, 17])
        for step in range(self.steps):
            chosen = [self.cases[i] for i in rng.integers(len(self.cases), size=self.batch)]
            samples = [self.sample(case, rng) for case in chosen]
            batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0] if key != "boxes"}
            batch["boxes"] = [s["boxes"] for s in samples]
            batch["spacing"] = torch.tensor([self.spacing] * self.batch, dtype=torch.float64)
            batch["levels"] = [(c.level,) if c.level != "none" else () for c in chosen]
            batch["stream"] = {"epoch": [0], "group": [0], "step": [step]}  # seeds the MAE masks: the same in both arms
            yield batch


def pretrain(kind: str, data: JointBatches, args: argparse.Namespace, export_dir: Path) -> dict:
    """Pretrain one arm (``unimed`` or ``mae``) from the seed's initial weights; returns its summary."""
    torch.manual_seed(args.seed)
    common = {"decoder_dim": 64, "decoder_depth": 2, "decoder_heads": 4, "lr": args.lr, "warmup_steps": args.steps // 10, "export_dir": str(export_dir)}
    module = UniMedPretrain(args.model, num_classes=NUM_CLASSES, **common) if kind == "unimed" else MAEPretrain(args.model, **common)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    seconds = time.perf_counter() - start
    module.eval()
    with torch.no_grad():  # the last batches again, without gradients: where the losses ended
        tail = [module.losses(b) for i, b in enumerate(data) if i >= args.steps - 8]
    final = {k: round(float(np.mean([float(t[k]) for t in tail])), 4) for k in tail[0] if k != "loss"}
    print(f"pretrain {kind}: {seconds:.0f} s, last 8 batches {final}", flush=True)
    return {"seconds": round(seconds, 1), "final_losses": final}


def random_backbone(args: argparse.Namespace, export_dir: Path) -> Path:
    """The pretrainings' initial backbone, untrained (the same draw: the backbone is built first)."""
    torch.manual_seed(args.seed)
    model = create_model(args.model)
    return save_pretrained(model, PretrainedCfg(architecture=args.model, provenance={"objective": "random init", "recipe": "random"}), export_dir)


def plot(runs: list[dict], path: Path) -> Path:
    """Dice per target: a group per evaluation arm, a bar per pretraining (mean over seeds, dots per seed)."""
    from matplotlib.figure import Figure

    targets = sorted({r["target"] for r in runs})
    arms = sorted({r["arm"] for r in runs})
    figure = Figure(figsize=(3.4 * len(targets), 3.2), layout="constrained")
    for ax, target in zip(figure.subplots(1, len(targets), squeeze=False)[0], targets):
        for a, arm in enumerate(arms):
            for p, pretraining in enumerate(PRETRAININGS):
                values = [r["dice"] for r in runs if (r["target"], r["arm"], r["pretraining"]) == (target, arm, pretraining) and r["dice"] is not None]
                if not values:
                    continue
                x = a + (p - 1) * 0.27
                ax.bar(x, np.mean(values), width=0.25, color=f"C{p}", label=pretraining if a == 0 else None)
                ax.plot([x] * len(values), values, "k.", markersize=4)
        ax.set(xticks=range(len(arms)), xticklabels=arms, ylim=(0, 1), ylabel="Dice (right hemisphere)", title=f"{target}, k = {runs[0]['k']} slices")
    figure.axes[0].legend(fontsize=7)
    figure.suptitle("MNI152 2x2x2 mm after pretraining on left-hemisphere crops (UniMed joint vs MAE only, same budget)", fontsize=8)
    figure.savefig(path, dpi=100)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/unimed.json"))
    parser.add_argument("--model", default="spad_vit_test", help="backbone architecture")
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps of each arm")
    parser.add_argument("--batch", type=int, default=4, help="pretraining crops per step")
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 48, 32], help="pretraining crop (Z, Y, X) voxels at 2 mm")
    parser.add_argument("--copies", type=int, default=2, help="pretraining copies per annotation level")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--arms", nargs="+", choices=("light_head", "pretrained"), default=["light_head"], help="evaluation arms of label_efficiency (pretrained: SPAD-UNETR fine-tuned)")
    parser.add_argument("--finetune-steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--ks", type=int, nargs="+", default=[4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="slice draws (and light-head seeds) of the evaluation")
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed (initial weights, copies, crops)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine, see label_efficiency)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 steps, one evaluation seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.copies = 10, [0], 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    case = build_case("2x2x2")
    cases = pretraining_cases(case, args.copies, args.seed)
    data = JointBatches(cases, args.steps, args.batch, tuple(args.patch), case.spacing, args.seed)
    runs, summaries = [], {}
    evaluation = argparse.Namespace(model=args.model, targets=list(TARGETS), min_positive_mm2=20.0, shuffle_labels=False)
    with tempfile.TemporaryDirectory(prefix="spadkit_unimed_bench_") as tmp:
        for pretraining in PRETRAININGS:
            weights = Path(tmp) / pretraining
            if pretraining == "random":
                random_backbone(args, weights)
                summaries[pretraining] = {"seconds": 0.0}
            else:
                summaries[pretraining] = pretrain(pretraining, data, args, weights)
            evaluation.weights = str(weights)
            for rows, grid in run_case(case, args.arms, args.ks, args.seeds, evaluation, TrainSettings(steps=args.finetune_steps)):  # noqa: B007 (grid: the last arm's summary)
                runs += [{"pretraining": pretraining, **r} for r in rows]
            result = {"runs": runs, "settings": settings(args, cases, summaries, grid, time.perf_counter() - started)}
            with atomic_path(args.out) as tmp_out:  # after every pretraining: a stopped run keeps what it finished
                Path(tmp_out).write_text(json.dumps(result, indent=1))
            plot(runs, args.out.with_suffix(".png"))
    return result


def settings(args: argparse.Namespace, cases: list[PretrainCase], summaries: dict, grid: dict, seconds: float) -> dict:
    """The ``settings`` block of the JSON: what was run, on what, how long it took."""
    return {
        "backbone": args.model,
        "pretraining": {
            "steps": args.steps, "batch": args.batch, "crop_voxels_zyx": list(args.patch), "spacing_mm": 2.0, "lr": args.lr, "seed": args.seed,
            "same_for_both": "initial weights, batch sequence, MAE masks (75 %), MAE decoder 64x2, AdamW + warm-up/cosine",
            "unimed": "UniMedPretrain(num_classes=3): MAE + presence BCE + voxel BCE/Dice + box bags, all weights 1",
            "cases": [{"level": c.level, "shape": list(c.image.shape), "boxes": len(c.boxes), "present": list(c.present), "absent": list(c.absent)} for c in cases],
            "data": "heldout_copy of the 2x2x2 mm MNI152 (gamma 0.6-1.5, bias field, noise, 0-3 voxel shift); crops in the left hemisphere only",
            **{kind: summary for kind, summary in summaries.items()},
        },
        "evaluation": {
            "arms": args.arms, "ks": args.ks, "seeds": args.seeds, "finetune_steps": args.finetune_steps if "pretrained" in args.arms else None,
            "protocol": "label_efficiency.run_case: k axial slices of the original T1's left hemisphere labelled, Dice on its right hemisphere (head voxels)",
            "grid": grid,
        },
        "classes": {"0": "background", **{str(v): k for k, v in TARGETS.items()}},
        "threads": args.threads,
        "total_seconds": round(seconds, 1),
    }


if __name__ == "__main__":
    main()
