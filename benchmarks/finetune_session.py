"""Full learning of the annotation loop, measured.

``python benchmarks/finetune_session.py --model spad_vit_test --steps 20 [--out DIR]``

On the MNI152 T1 at 1 mm (189, 233, 197) in a fresh tmp store, a simulated annotator corrects
--rounds suggested slices (gray matter > 0.5 as the truth; the 3rd, 7th, ... are the fixed
validation slices). Then a full fine-tune of --steps runs in its child process (SPAD-UNETR on the
session's SPAD-ViT). Recorded: the child's seconds, steps/s, the validation Dice of the session
before (light head on the original features), after (light head refitted on the fine-tuned
backbone's features) and of the fine-tuned network alone (sliding window), whether it was
swapped in, and the submit -> refresh time of --after corrections made after the swap (medians).
Writes JSON + a PNG bar plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _mni_store import CASE, mni_store

from spadkit.active import AnnotationSession
from spadkit.models import create_model


def correct(session: AnnotationSession, truth: np.ndarray, rounds: int) -> list[float]:
    refresh = []
    for _ in range(rounds):
        hint = session.suggest_next()
        session.predict(tuple(slice(hint.index, hint.index + 1) if a == hint.axis else slice(None) for a in range(3)))
        refresh.append(session.submit_correction(hint.axis, hint.index, np.take(truth, hint.index, axis=hint.axis)).timings["refresh_s"])
    return refresh


def run(model_name: str, steps: int, rounds: int, after: int, root: Path) -> dict:
    store, truth = mni_store(root)
    torch.manual_seed(0)
    session = AnnotationSession(store, CASE, create_model(model_name), "seg")
    before_refresh = correct(session, truth, rounds)
    t = time.perf_counter()
    job = session.start_finetune(max_steps=steps, score_network=True)
    while job.running:
        time.sleep(1)
    wall = time.perf_counter() - t
    t = time.perf_counter()
    result = session.poll_finetune()
    poll_s = time.perf_counter() - t
    after_refresh = correct(session, truth, after)
    return {
        "model": model_name,
        "steps": steps,
        "rounds": rounds,
        "result": dataclasses.asdict(result),
        "child_seconds": result.seconds,
        "seconds_per_step_upper_bound": result.seconds / steps,
        "wall_s": wall,
        "poll_s": poll_s,
        "refresh_median_s_before": statistics.median(before_refresh),
        "refresh_median_s_after_swap": statistics.median(after_refresh) if after_refresh else None,
        "validation_dice_after_more_rounds": session.validation_dice(),
        "threads": torch.get_num_threads(),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = ["light head, original features", "light head, fine-tuned features", "fine-tuned network alone"]
    keys = ["validation_dice_before", "validation_dice_after", "network_validation_dice"]
    width = 0.8 / len(keys)
    for k, (name, key) in enumerate(zip(names, keys)):
        ax.bar([i + k * width for i in range(len(rows))], [r["result"][key] or 0 for r in rows], width, label=name)
    ax.set_xticks([i + width for i in range(len(rows))], [f"{r['model']}\n{r['steps']} steps, {r['child_seconds']:.0f} s" for r in rows])
    ax.set_ylabel("validation Dice (gray matter)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["spad_vit_test"])
    parser.add_argument("--steps", type=int, nargs="+", default=[20])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--after", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rows = []
    for name, steps in zip(args.model, args.steps * len(args.model) if len(args.steps) == 1 else args.steps):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(name, steps, args.rounds, args.after, Path(tmp)))
            print(json.dumps(rows[-1], indent=1, default=str), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_session.json").write_text(json.dumps(rows, indent=1, default=str))
    plot(rows, out / "finetune_session.png")


if __name__ == "__main__":
    main()
