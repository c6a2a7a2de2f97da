"""A simulated annotator in the loop: does ``suggest_next`` pick better slices than random or even spacing?

``python benchmarks/annotation_loop.py --out benchmarks/results/annotation_loop.json`` (``--quick``: seconds, for the test).

On nilearn's MNI152 T1 (1 mm, 189x233x197) and its thick-slice copy (``spadkit.demo.thick_slices``,
1x1x3 mm, 63x233x197), the truth is the gray-matter map thresholded at 0.5 (for the thick copy the
map is averaged over the same 3 slices first). For each slice order and seed a fresh
``AnnotationSession`` (light head on frozen backbone features, the backbone at a seeded random
init) is corrected for ``--rounds`` rounds: the annotator looks at the chosen slice
(``session.predict``) and submits the true mask of that slice (``submit_correction``), replacing
the prediction there. Orders:

* ``suggested``: the best slice of ``session.suggest_next`` (any axis) that is not held out;
* ``random``: a uniformly random slice with tissue on any of the three axes (the candidates
  ``suggest_next`` ranks), without replacement;
* ``even``: ``--rounds`` evenly spaced axial slices over the tissue's extent (offset drawn per seed),
  visited coarse to fine (bisection order), so every prefix is spread out too.

Held-out evaluation: every ``HELD_OUT_EVERY``-th axial slice (z % 5 == 2) is never offered to the
annotator by any order. Dice is measured on those slices (every 2nd voxel in-plane) minus the
voxels a y or x correction crossed in that run (one row per held-out slice and correction).

Recorded per round: held-out Dice, seconds from submit to refreshed visible slice, bytes the
label version wrote (the store's ``bytes_written`` when it records it, else the size of the
version's files that no other version shares). Then the seconds of full fine-tunes
(``session.start_finetune``, every ``--finetune-every`` rounds of an extra suggested run), and, in a real napari viewer
(needs a display: run under ``xvfb-run``) with the plugin's *Annotate* widget, the longest gap between GUI
timer ticks while *Learn* runs ``submit_correction`` in a napari thread worker, beside the same probe on the idle viewer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.filters import threshold_otsu

from spadkit.active import AnnotationSession, Round, dice
from spadkit.demo import nilearn_file, thick_slices
from spadkit.ingest import intensity_stats
from spadkit.io import read_volume
from spadkit.io.omezarr import OMEZarrStore
from spadkit.models import create_model
from spadkit.volume import Volume

try:  # benchmarks/ is not a package: run as a script or imported by the test
    from benchmarks._machine import cpu_model, package_version
except ImportError:
    from _machine import cpu_model, package_version

ORDERS = ("suggested", "random", "even")
HELD_OUT_EVERY, HELD_OUT_PHASE = 5, 2
#: suggestions asked for at once; the best one not held out is taken
SUGGESTION_POOL = 64

Slice = tuple[int, int]  # (axis, index)


# ---------------------------------------------------------------------- data
@dataclasses.dataclass
class Case:
    """One case of the benchmark store: its id, ``(Z, Y, X)`` int32 truth, per axis the first and last slice with tissue,
    and the held-out voxels ``(N, 3)``."""

    name: str
    truth: np.ndarray
    tissue: list[tuple[int, int]]
    heldout: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.truth.shape)


def offered(axis: int, index: int) -> bool:
    """Whether the annotator may be given this slice (held-out axial slices never are)."""
    return axis != 0 or index % HELD_OUT_EVERY != HELD_OUT_PHASE


def heldout_voxels(shape: tuple[int, int, int], in_plane_stride: int = 2) -> torch.Tensor:
    """``(N, 3)`` voxel indices of the held-out axial slices, every ``in_plane_stride``-th voxel in-plane."""
    axes = [np.arange(HELD_OUT_PHASE, shape[0], HELD_OUT_EVERY), np.arange(0, shape[1], in_plane_stride), np.arange(0, shape[2], in_plane_stride)]
    return torch.from_numpy(np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3))


def tissue_extent(image: np.ndarray) -> list[tuple[int, int]]:
    """Per axis of ``image`` ``(Z, Y, X)``, the first and last slice with voxels above Otsu's threshold (what a person sees as the head)."""
    body = image > threshold_otsu(image)
    extents = []
    for axis in range(3):
        rows = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        extents.append((int(rows[0]), int(rows[-1])))
    return extents


def spacing_name(volume: Volume) -> str:
    """``"1mm"`` for an isotropic volume, ``"1x1x3mm"`` (in-plane x slice thickness) for a thick-slice one."""
    z, y, x = (f"{s:g}" for s in volume.spacing)
    return f"{z}mm" if z == y == x else f"{y}x{x}x{z}mm"


def mni_volumes(step: int) -> list[tuple[Volume, np.ndarray]]:
    """The MNI152 T1 and its gray-matter probability (0..1) at every ``step``-th voxel, then both with 3 axial slices averaged."""
    t1 = read_volume(nilearn_file("t1")).load()
    gm = read_volume(nilearn_file("gm")).numpy()[0].astype(np.float32)
    gm /= gm.max()  # stored 0..1 or 0..255 depending on the nilearn version
    affine = t1.affine.copy()
    affine[:3, :3] *= step
    t1 = Volume(np.ascontiguousarray(t1.numpy()[:, ::step, ::step, ::step]).astype(np.int16), affine, modality=t1.modality)
    gm = np.ascontiguousarray(gm[::step, ::step, ::step])
    gm_thick = thick_slices(Volume((gm * 10000)[None].astype(np.int16), affine)).numpy()[0] / 10000.0
    return [(t1, gm), (thick_slices(t1), gm_thick)]


def write_cases(store: OMEZarrStore, step: int) -> list[Case]:
    """Both volumes of :func:`mni_volumes` as cases named by their spacing; truth = gray-matter probability > 0.5."""
    cases = []
    for volume, gm in mni_volumes(step):
        name = spacing_name(volume)
        store.write_case(name, volume, attrs={"intensity": intensity_stats(volume)})
        truth = (gm > 0.5).astype(np.int32)
        cases.append(Case(name, truth, tissue_extent(volume.numpy()[0]), heldout_voxels(truth.shape)))
    return cases


# ---------------------------------------------------------------------- slice orders
Picker = Callable[[AnnotationSession, list[Slice]], Slice]  # (session, slices done) -> the next slice


def candidates(case: Case, done: list[Slice], axes: tuple[int, ...]) -> list[Slice]:
    """The slices with tissue on ``axes`` that may be given to the annotator and are not corrected yet."""
    return [(a, i) for a in axes for i in range(case.tissue[a][0], case.tissue[a][1] + 1) if offered(a, i) and (a, i) not in done]


def bisection_order(n: int) -> list[int]:
    """``range(n)`` coarse to fine: the middle first, then the middles of the halves, ... (each prefix spread out)."""
    order, spans = [], [(0, n)]
    while spans:
        lo, hi = spans.pop(0)
        if lo < hi:
            mid = (lo + hi) // 2
            order.append(mid)
            spans += [(lo, mid), (mid + 1, hi)]
    return order


def make_picker(order: str, case: Case, rng: np.random.Generator, rounds: int) -> Picker:
    """The slice order of one run (see the module docstring)."""
    if order == "suggested":

        def pick(session: AnnotationSession, done: list[Slice]) -> Slice:
            for hint in session.suggest_next(top=SUGGESTION_POOL):
                if offered(hint.axis, hint.index):
                    return hint.axis, hint.index
            raise RuntimeError(f"none of the top {SUGGESTION_POOL} suggestions is offered")

    elif order == "random":

        def pick(session: AnnotationSession, done: list[Slice]) -> Slice:
            free = candidates(case, done, (0, 1, 2))
            return free[rng.integers(len(free))]

    else:
        (lo, hi), offset, sequence = case.tissue[0], rng.uniform(), bisection_order(rounds)

        def pick(session: AnnotationSession, done: list[Slice]) -> Slice:
            target = lo + (sequence[len(done) % rounds] + offset) * (hi + 1 - lo) / rounds
            return min(candidates(case, done, (0,)), key=lambda s: abs(s[1] - target))

    return pick


# ---------------------------------------------------------------------- measurements
def visible(axis: int, index: int) -> tuple[slice, ...]:
    return tuple(slice(index, index + 1) if a == axis else slice(None) for a in range(3))


@torch.no_grad()
def heldout_dice(session: AnnotationSession, case: Case, features: torch.Tensor) -> float:
    """Gray-matter Dice of the current head on the held-out voxels no correction of this run crossed."""
    index = case.heldout
    keep = torch.from_numpy(~session.annotated[index[:, 0], index[:, 1], index[:, 2]])
    pred = session.head(features[keep]).argmax(1).numpy()
    kept = index[keep]
    return dice(pred, case.truth[kept[:, 0], kept[:, 1], kept[:, 2]], 2)


def bytes_written(store: OMEZarrStore, case_id: str, label_name: str) -> tuple[int, str]:
    """Bytes the newest label version wrote: the store's record, else its files no other version shares (hard links)."""
    entry = store.label_versions(case_id, label_name)[-1]
    if "bytes_written" in entry:
        return int(entry["bytes_written"]), "store"
    folder = Path(store.url) / case_id / "labels" / label_name / entry["path"]
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.stat().st_nlink == 1), "files"


def seeded_model(name: str, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name)


def run_order(store: OMEZarrStore, case: Case, model: torch.nn.Module, order: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One simulated annotator: ``args.rounds`` corrections in ``order``; one row per round."""
    session = AnnotationSession(store, case.name, model, f"{order}{seed}", steps=args.head_steps)
    features = session.features.gather(case.heldout)
    pick = make_picker(order, case, np.random.default_rng([seed, ORDERS.index(order)]), args.rounds)
    done: list[Slice] = []
    rows = []
    for rnd in range(1, args.rounds + 1):
        t = time.perf_counter()
        axis, index = pick(session, done)
        pick_s = time.perf_counter() - t
        done.append((axis, index))
        session.predict(visible(axis, index))
        result: Round = session.submit_correction(axis, index, np.take(case.truth, index, axis=axis))
        written, source = bytes_written(store, case.name, session.label_name)
        row = {
            "volume": case.name,
            "order": order,
            "seed": seed,
            "round": rnd,
            "axis": axis,
            "index": index,
            "dice": heldout_dice(session, case, features),
            "submit_to_refresh_s": result.timings["refresh_s"],
            "timings": result.timings,
            "pick_s": pick_s,
            "bytes_written": written,
            "bytes_source": source,
            "validation_dice": result.validation_dice,
            "edit_dice": result.edit_dice,
        }
        rows.append(row)
        print(f"{case.name:8s} {order:9s} seed {seed} round {rnd:2d}: {'zyx'[axis]}={index:3d} Dice {row['dice']:.4f}  refresh {row['submit_to_refresh_s']:.2f} s  {written / 1e3:.0f} kB", flush=True)
    return rows


def finetune_timings(store: OMEZarrStore, case: Case, model: torch.nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Full fine-tunes (``session.start_finetune``, a separate process) every ``args.finetune_every`` rounds of a suggested
    run of its own (outside the comparison, which they would change), each waited for and swapped in when better."""
    session = AnnotationSession(store, case.name, model, "finetune", steps=args.head_steps)
    pick = make_picker("suggested", case, np.random.default_rng(0), args.rounds)
    done: list[Slice] = []
    out = []
    for rnd in range(1, args.rounds + 1):
        axis, index = pick(session, done)
        done.append((axis, index))
        session.submit_correction(axis, index, np.take(case.truth, index, axis=axis))
        if rnd % args.finetune_every:
            continue
        before = heldout_dice(session, case, session.features.gather(case.heldout))
        result = session.start_finetune(max_steps=args.finetune_steps).wait()
        row = {"round": rnd, **dataclasses.asdict(result)}  # seconds: the child's wall time, start-up to saved weights
        row.update(heldout_dice_before=before, heldout_dice_after=heldout_dice(session, case, session.features.gather(case.heldout)))
        out.append(row)
        print(f"fine-tune after round {rnd}: {result.seconds:.1f} s, {result.steps} steps, {result.reason}", flush=True)
    return out


# ---------------------------------------------------------------------- GUI stall in a real napari viewer
def gui_stall(store: OMEZarrStore, case: Case, model_name: str, rounds: int) -> dict[str, Any]:
    """Longest GUI-thread stall (ms) of a shown napari viewer while the plugin's annotation widget learns.

    Per round, as a person would: press *Next slice* (the widget shows the suggestion), paint the true slice into
    the session's labels layer, press *Learn* (``submit_correction`` in a napari thread worker, then the layers
    refresh in the GUI thread). :class:`spadkit_napari._stall.StallProbe` (a 10 ms Qt timer) measures the longest gap
    during *Learn*; the same probe on the idle viewer, for as long, is the floor (scheduling, redraws).
    """
    if not os.environ.get("DISPLAY"):
        return {"max_ms": None, "reason": "no display: run under xvfb-run -a -s '-screen 0 1280x1024x24'"}
    import napari
    from qtpy.QtWidgets import QApplication
    from spadkit_napari._annotation import slice_on_screen, write_slice
    from spadkit_napari._stall import StallProbe

    viewer = napari.Viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("spadkit", "Annotate")
    widget.store_path.value = store.url
    widget.case.value, widget.label_name.value, widget.model.value = case.name, "gui", model_name
    app = QApplication.instance()

    def events_for(seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and not until():
            app.processEvents()
            time.sleep(0.002)

    def press(button: Any) -> float:
        start = time.perf_counter()
        button.native.click()
        events_for(600, until=lambda: widget.busy is None)
        if widget.status.value.startswith("Error"):
            raise RuntimeError(f"the annotation widget failed: {widget.status.value}")
        return time.perf_counter() - start

    press(widget.open_button)
    rows = []
    for _ in range(rounds):
        press(widget.next_button)
        labels = widget.layers["labels"]
        axis, index = slice_on_screen(viewer, labels)
        write_slice(labels, axis, index, np.take(case.truth, index, axis=axis))
        with StallProbe(interval_ms=10) as learning:
            seconds = press(widget.learn_button)
        with StallProbe(interval_ms=10) as idle:
            events_for(seconds)
        rows.append({"axis": axis, "index": index, "learn_s": seconds, "learning_max_ms": learning.max_ms, "learning_over_100ms": learning.stalls(100), "idle_max_ms": idle.max_ms, "idle_over_100ms": idle.stalls(100)})
        print(f"GUI stall, Learn on {'zyx'[axis]}={index}: {learning.max_ms:.0f} ms over {seconds:.2f} s ({learning.stalls(100)} gaps > 100 ms); idle {idle.max_ms:.0f} ms", flush=True)
    widget.close_session()
    viewer.close()
    return {
        "max_ms": max(r["learning_max_ms"] for r in rows),
        "idle_max_ms": max(r["idle_max_ms"] for r in rows),
        "probe": "spadkit_napari._stall.StallProbe(interval_ms=10) around the Annotate widget's Learn button",
        "volume": case.name,
        "rounds": rows,
    }


# ---------------------------------------------------------------------- summary and plot
def mean_curves(rows: list[dict[str, Any]], volume: str) -> dict[str, np.ndarray]:
    """Per order run on ``volume``, the held-out Dice per round averaged over seeds ``(rounds,)``."""
    runs: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if r["volume"] == volume:
            runs.setdefault(r["order"], {}).setdefault(r["seed"], []).append(r["dice"])
    return {order: np.mean(list(runs[order].values()), axis=0) for order in ORDERS if order in runs}


def summarise(rows: list[dict[str, Any]], volumes: list[str], target_rounds: int) -> dict[str, Any]:
    """Per volume: the Dice random reaches after all rounds (mean over seeds), and the first round each order reaches it."""
    out = {}
    for volume in volumes:
        curves = mean_curves(rows, volume)
        target = float(curves["random"][-1]) if "random" in curves else None
        reach = {o: next((k + 1 for k, d in enumerate(c) if d >= target), None) for o, c in curves.items()} if target is not None else {}
        out[volume] = {
            "random_final_dice": target,
            "rounds_to_random_final": reach,
            "target_met": reach.get("suggested") is not None and reach["suggested"] <= target_rounds,
            "mean_dice": {o: [float(d) for d in c] for o, c in curves.items()},
        }
    refresh = [r["submit_to_refresh_s"] for r in rows]
    written = [r["bytes_written"] for r in rows]
    out["submit_to_refresh_s"] = {"median": statistics.median(refresh), "max": max(refresh)}
    out["bytes_written"] = {"median": statistics.median(written), "max": max(written)}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volumes = result["settings"]["volumes"]
    fig, axes = plt.subplots(1, len(volumes) + 1, figsize=(5 * (len(volumes) + 1), 4))
    colours = {"suggested": "tab:red", "random": "tab:grey", "even": "tab:blue"}
    rows = result["rounds"]
    for ax, volume in zip(axes, volumes):
        summary = result["summary"][volume]
        for order in summary["mean_dice"]:
            for seed in result["settings"]["seeds"]:
                run = [r for r in rows if r["volume"] == volume and r["order"] == order and r["seed"] == seed]
                ax.plot([r["round"] for r in run], [r["dice"] for r in run], color=colours[order], alpha=0.25, lw=1)
            curve = summary["mean_dice"][order]
            reach = summary["rounds_to_random_final"].get(order)
            ax.plot(range(1, len(curve) + 1), curve, color=colours[order], lw=2, marker="o", ms=3, label=f"{order} (mean; reaches target at round {reach})")
        if summary["random_final_dice"] is not None:
            ax.axhline(summary["random_final_dice"], color="k", ls=":", lw=1, label=f"target: random after {len(curve)} rounds")
        ax.set(title=f"MNI152 gray matter, {volume}", xlabel="corrected slices", ylabel="held-out Dice", xticks=range(1, len(curve) + 1))
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[-1]
    orders = result["settings"]["orders_run"]
    ax.boxplot([[r["submit_to_refresh_s"] for r in rows if r["order"] == o] for o in orders], tick_labels=orders)
    stall, written = result["gui_stall_max_ms"], result["summary"]["bytes_written"]["median"]
    stall_text = "not measured" if stall is None else f"{stall:.0f} ms"
    ax.set_title(f"submit -> refreshed slice, all rounds\nGUI stall max {stall_text}; {written / 1e3:.0f} kB per correction (median)", fontsize=9)
    ax.set_ylabel("seconds")
    settings = result["settings"]
    fig.suptitle(f"{settings['model']} (random init) + light head, seeds {settings['seeds']} (thin lines); held-out: axial slices z % {HELD_OUT_EVERY} == {HELD_OUT_PHASE}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- main
@contextlib.contextmanager
def workspace(folder: str | None) -> Iterator[Path]:
    if folder:
        yield Path(folder)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/annotation_loop.json"))
    parser.add_argument("--model", default="spad_vit_small")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target-rounds", type=int, default=6, help="the suggested order must reach random's final Dice within this many rounds")
    parser.add_argument("--step", type=int, default=1, help="take every STEP-th voxel of the MNI152 (1: its 1 mm)")
    parser.add_argument("--gui-rounds", type=int, default=3, help="rounds measured in the napari viewer (0: skip)")
    parser.add_argument(
        "--finetune-every", type=int, help="time a full fine-tune every N rounds of an extra suggested run (0: off; default 10, off for --quick or without session.start_finetune)"
    )
    parser.add_argument("--finetune-steps", type=int, default=10, help="optimiser steps of each full fine-tune (the session's default: 200)")
    parser.add_argument("--head-steps", type=int, default=100, help="Adam steps of each light-head fit (the session's default: 100)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for feature extraction (the light head uses one)")
    parser.add_argument("--workdir", help="keep the store here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="the test's run: spad_vit_test, MNI152 at 4 mm, 4 rounds, 1 seed, 30 head steps, 1 GUI round, no fine-tune")
    args = parser.parse_args(argv)
    if args.finetune_every is None:
        args.finetune_every = 10 if hasattr(AnnotationSession, "start_finetune") and not args.quick else 0
    if args.quick:
        args.model, args.step, args.rounds, args.seeds, args.head_steps, args.gui_rounds, args.target_rounds = "spad_vit_test", 4, 4, [0], 30, 1, 3
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start, load = time.perf_counter(), os.getloadavg()
    with workspace(args.workdir) as root:
        store = OMEZarrStore(str(root / "loop.zarr"), mode="a")
        cases = write_cases(store, args.step)
        rows = []
        for seed in args.seeds:
            model = seeded_model(args.model, seed)
            for case in cases:
                for order in args.orders:
                    rows += run_order(store, case, model, order, seed, args)
        tunes = finetune_timings(store, cases[0], seeded_model(args.model, args.seeds[0]), args) if args.finetune_every else []
        stall = gui_stall(store, cases[0], args.model, args.gui_rounds) if args.gui_rounds else {"max_ms": None, "reason": "--gui-rounds 0"}
    settings = {
        "model": args.model,
        "backbone_weights": "random init (torch.manual_seed(seed)); the light head is what learns",
        "volumes": [c.name for c in cases],
        "shapes_zyx": {c.name: list(c.shape) for c in cases},
        "step": args.step,
        "rounds": args.rounds,
        "seeds": args.seeds,
        "orders_run": args.orders,
        "target_rounds": args.target_rounds,
        "held_out": f"axial slices z % {HELD_OUT_EVERY} == {HELD_OUT_PHASE} (never offered), every 2nd voxel in-plane, minus voxels a y/x correction of the run crossed",
        "orders": {"suggested": "session.suggest_next, best not held out", "random": "uniform slice with tissue, any axis", "even": "evenly spaced axial slices over the tissue, bisection order"},
        "head_steps": args.head_steps,
        "finetune_every": args.finetune_every,
        "finetune_steps": args.finetune_steps,
        "quick": args.quick,
        "threads": args.threads,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": package_version("torch"),
        "load_average_start": load,
        "load_average_end": os.getloadavg(),
        "wall_s": time.perf_counter() - start,
    }
    summary = summarise(rows, settings["volumes"], args.target_rounds)
    summary["finetune_s"] = {"median": statistics.median(t["seconds"] for t in tunes), "n": len(tunes)} if tunes else None
    result = {"rounds": rows, "gui_stall_max_ms": stall["max_ms"], "gui_stall": stall, "finetune": tunes, "summary": summary, "settings": settings}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    for volume in settings["volumes"]:
        s = result["summary"][volume]
        print(f"{volume}: random after {args.rounds} rounds {s['random_final_dice']}; rounds to reach it {s['rounds_to_random_final']}; target met: {s['target_met']}")
    return result


if __name__ == "__main__":
    main()
