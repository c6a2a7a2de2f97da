"""Few-shot fine-tuning throughput of SPAD-UNETR, side by side with MONAI's UNETR.

One *step* is what ``SegFinetune`` does per batch: zero the gradients, forward,
the masked Dice + cross-entropy loss over the annotated voxels
(``SegFinetune.loss``), backward, and an AdamW step of its own
``configure_optimizers()`` (layer-wise decay groups).

Data: nilearn's MNI152 T1 (1 mm, 189 x 233 x 197 voxels) in an OME-Zarr store
with a label version that annotates ``ANNOTATED_SLICES`` axial slices of the
gray matter (probability > 0.5) and leaves the rest unknown: the few-shot case
of the annotation loop. Batches come from ``PatchStream`` with the label-weighted
sampler restricted to the annotated slices (2 reader threads, as the fine-tune
configs), patch ``--patch`` voxels, ``--batch`` patches per batch.

Runs (each ``--warmup`` untimed steps, then ``--steps`` timed ones):

* ``feed="stream"``: spadkit models trained straight from the stream (loading,
  host-to-device copy and the step all inside the timing);
* ``feed="tensors"``: the same batches pre-read into memory, for spadkit's
  ``spad_unetr_small`` and for the peer ``monai_unetr_small``, stepping in turn
  on the CPU (``A B A B ...``: load changes on the shared machine hit both):
  ``monai.networks.nets.UNETR`` of the same width, depth, heads and feature size
  (hidden 384, 12 blocks, 6 heads, feature size 16, patch 16, ``img_size`` =
  the patch), with the very same loss and AdamW settings. The gap between the
  two feeds of ``spad_unetr_small`` is what the loader costs.

CPU: ``torch.set_num_threads(--threads)`` (default 1: on the shared 2-core machine
under a load of ~17, two OpenMP threads made a ``spad_unetr_test`` step 12x slower,
26 s against 1.5 s), float32, ``peak_memory_mb`` None.
GPU (when ``torch.cuda.is_available()``): ``spad_unetr_base`` (stream and
tensors) and ``monai_unetr_base`` (tensors) on ``--gpu-patch`` patches, batch
``--gpu-batch``, bf16 autocast, ``peak_memory_mb`` =
``torch.cuda.max_memory_allocated`` during the run. ``samples_per_s`` is the
batch size over the median step time.

Regime ``label_efficiency`` (``--regimes label``): the step of the network arms of
``benchmarks/label_efficiency.py`` (``_label_networks.train_and_predict``), batch 1,
32x64x64 mm patches around labelled axial slices of the MNI152 T1 block-averaged to
the ``2x2x2`` (16x32x32 voxels) and ``1x1x3`` (8x64x64) mm grids, masked Dice + CE,
AdamW. Arms, stepping in turn on the same patches: ``spad_unetr_test`` and
``spad_unetr_small`` on the CPU fast kernels (:mod:`spadkit.models.spad`) and on
PyTorch's own (``kernels="reference"``: ``F.conv3d``, which sends a single 8-32
channel patch to ``slow_conv3d``, the state before the fast paths), MONAI's ``UNet``
of the benchmark (channels 8-64, residual units) and, where the patch is a multiple of
16 on every axis (2x2x2 only), MONAI's ``UNETR`` of ``spad_unetr_small``'s size.
Rows give CPU seconds (``time.process_time``, all threads) and wall seconds per step,
and the CPU-time ratio to MONAI's UNet.

Usage::

    python benchmarks/finetune_speed.py --out benchmarks/results/finetune_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model, package_version

from spadkit.data import DatasetSource, LabelSampler, PatchStream
from spadkit.demo import nilearn_file
from spadkit.ingest import intensity_stats
from spadkit.io import OMEZarrStore, read_volume
from spadkit.models.spad import reference_kernels
from spadkit.tasks.finetune import SegFinetune
from spadkit.volume import LabelVolume

#: Axial slices of the MNI152 volume a person reviewed (evenly spread over the brain).
ANNOTATED_SLICES = tuple(range(40, 150, 14))
#: MONAI UNETR settings matching each SPAD-UNETR (width, heads, feature size; 12 blocks).
MONAI_PEERS = {"spad_unetr_small": {"hidden_size": 384, "mlp_dim": 1536, "num_heads": 6, "feature_size": 16},
               "spad_unetr_base": {"hidden_size": 768, "mlp_dim": 3072, "num_heads": 12, "feature_size": 16}}  # fmt: skip


def annotated_store(folder: Path) -> str:
    """The MNI152 T1 with a ``seg`` label version annotated on :data:`ANNOTATED_SLICES` only."""
    image = read_volume(nilearn_file("t1"))
    gray = read_volume(nilearn_file("gm")).numpy()[0]
    known = np.zeros(image.spatial_shape, bool)
    known[list(ANNOTATED_SLICES)] = True
    label = LabelVolume(np.where(known, gray / gray.max() > 0.5, 0)[None].astype(np.uint8), image.affine)
    store = OMEZarrStore(str(folder / "mni.zarr"), mode="a")
    store.write_case("mni152", image, None, attrs={"intensity": intensity_stats(image)})
    store.save_label("mni152", label, annotated=known, message=f"{len(ANNOTATED_SLICES)} reviewed axial slices")
    return store.url


def make_stream(url: str, patch: int, batch: int) -> PatchStream:
    return PatchStream([DatasetSource(url, label="seg")], patch_size=patch, batch_size=batch, sampler=LabelSampler(0.5), samples_per_case=16, num_threads=2)


def cycle(stream: PatchStream) -> Iterator[dict[str, Any]]:
    """The stream's batches, epoch after epoch."""
    while True:
        yield from stream


class Step:
    """One fine-tuning step of a segmenter with ``SegFinetune``'s loss and optimiser."""

    def __init__(self, name: str, patch: int, device: torch.device, bf16: bool):
        self.task = SegFinetune(model=name if name.startswith("spad_") else "spad_unetr_test", num_classes=2)
        if name.startswith("monai_"):
            from monai.networks.nets import UNETR

            peer = MONAI_PEERS[name.replace("monai_", "spad_")]
            self.model: torch.nn.Module = UNETR(1, 2, img_size=patch, qkv_bias=True, **peer)
            self.forward = lambda batch: self.model(batch["image"])
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.task.hparams.lr, weight_decay=self.task.hparams.weight_decay)
        else:
            self.model = self.task.model
            self.forward = lambda batch: self.model(batch["image"], batch["spacing"])
            self.optimizer = self.task.configure_optimizers()["optimizer"]
        self.model.to(device).train()
        self.task.to(device)
        self.device, self.bf16 = device, bf16

    def __call__(self, batch: dict[str, Any]) -> float:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        self.optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            logits = self.forward(batch)
        loss = self.task.loss(logits.float(), *self.task._targets(batch))
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @property
    def params_m(self) -> float:
        return sum(p.numel() for p in self.model.parameters()) / 1e6


def measure(names: Sequence[str], feeds: Sequence[Iterator[dict[str, Any]]], args: argparse.Namespace, device: torch.device, patch: int, batch: int) -> list[dict[str, Any]]:
    """Median step times of ``names``, each fed by its feed, stepping in turn (``A B A B ...``, so a
    change in machine load hits all alike); ``args.warmup`` untimed rounds first."""
    bf16 = device.type == "cuda"
    steps = []
    for name in names:
        torch.manual_seed(0)
        steps.append(Step(name, patch, device, bf16))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, losses = [[] for _ in names], [[] for _ in names]
    for i in range(args.warmup + args.steps):
        for step, feed, times, loss in zip(steps, feeds, seconds, losses):
            sync()
            start = time.perf_counter()
            loss.append(step(next(feed)))
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    peak = round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None
    return [
        {
            "model": name,
            "implementation": "monai" if name.startswith("monai_") else "spadkit",
            "device": device.type,
            "precision": "bf16-mixed" if bf16 else "fp32",
            "batch_size": batch,
            "patch": [patch] * 3,
            "samples_per_s": round(batch / float(np.median(times)), 3),
            "peak_memory_mb": peak,
            "s_per_step": round(float(np.median(times)), 4),
            "s_per_step_iqr": [round(float(q), 4) for q in np.percentile(times, [25, 75])],
            "params_m": round(step.params_m, 2),
            "first_last_loss": [round(loss[0], 4), round(loss[-1], 4)],
        }
        for name, step, times, loss in zip(names, steps, seconds, losses)
    ]


def section(url: str, models: Sequence[str], args: argparse.Namespace, device: torch.device, patch: int, batch: int) -> list[dict[str, Any]]:
    """Stream-fed runs of ``models`` one at a time, then the last one and its MONAI peer on the same
    pre-read batches: in turn on the CPU (a shared machine), one after the other on a GPU (memory per model)."""
    runs = [{**measure([name], [cycle(make_stream(url, patch, batch))], args, device, patch, batch)[0], "feed": "stream"} for name in models]
    cached = list(itertools.islice(cycle(make_stream(url, patch, batch)), args.warmup + args.steps))
    pair = [models[-1], models[-1].replace("spad_", "monai_")]
    if device.type == "cpu":
        runs += [{**run, "feed": "tensors"} for run in measure(pair, [iter(cached), iter(cached)], args, device, patch, batch)]
    else:
        runs += [{**measure([name], [iter(cached)], args, device, patch, batch)[0], "feed": "tensors"} for name in pair]
    for run in runs:
        print(json.dumps(run), flush=True)
    return runs


#: Grids of ``benchmarks/label_efficiency.py`` whose network step the ``label`` regime times.
LABEL_GRIDS = ("2x2x2", "1x1x3")
#: (model, kernels) arms of the ``label`` regime; MONAI's UNETR joins where the patch allows it.
LABEL_ARMS = (("spad_unetr_test", "fast"), ("spad_unetr_test", "reference"), ("spad_unetr_small", "fast"), ("spad_unetr_small", "reference"), ("monai_unet", None))


class LabelStep:
    """One step of a label-efficiency network arm: forward, masked Dice + CE, backward, AdamW
    (the loop body of ``_label_networks.train_and_predict``, with its settings)."""

    def __init__(self, model: str, kernels: str | None, patch: Sequence[int], spacing: Sequence[float], num_classes: int):
        from _label_networks import TrainSettings, monai_unet, spad_unetr
        from monai.losses import MaskedDiceLoss

        settings = TrainSettings()
        if model == "monai_unet":
            self.model, groups = monai_unet(num_classes, seed=0)
            self.forward = self.model
        elif model == "monai_unetr_small":
            from monai.networks.nets import UNETR

            torch.manual_seed(0)
            self.model = UNETR(1, num_classes, img_size=tuple(patch), qkv_bias=True, **MONAI_PEERS["spad_unetr_small"])
            groups, self.forward = [{"params": list(self.model.parameters())}], self.model
        else:
            self.model, groups = spad_unetr(model, None, num_classes, seed=0, layer_decay=settings.layer_decay)
            spacing_t = torch.tensor(spacing)
            self.forward = lambda x: self.model(x, spacing_t)
        self.optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
        self.dice = MaskedDiceLoss(include_background=False, softmax=True, batch=True)
        self.kernels = contextlib.nullcontext if kernels != "reference" else reference_kernels
        self.model.train()

    def __call__(self, image: torch.Tensor, label: torch.Tensor, annotated: torch.Tensor) -> float:
        from _label_networks import masked_loss

        with self.kernels():
            loss = masked_loss(self.forward(image), label, annotated, self.dice)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return float(loss.detach())


def label_regime(args: argparse.Namespace) -> list[dict[str, Any]]:
    """CPU step times of :data:`LABEL_ARMS` on each of :data:`LABEL_GRIDS`, stepping in turn on the same patches."""
    from _label_networks import PatchSampler, TrainSettings, multiple_of, pad_to
    from label_efficiency import TARGETS, build_case

    runs = []
    for grid in LABEL_GRIDS:
        case = build_case(grid)
        multiple = multiple_of(case.spacing, case.image.shape[0], pyramid=8)
        slices = list(range(case.image.shape[0] // 3, 2 * case.image.shape[0] // 3, max(1, case.image.shape[0] // 12)))
        annotated = np.zeros(case.image.shape, bool)
        annotated[slices] = True
        padded = [pad_to(a, multiple) for a in (case.image, case.labels, annotated)]
        # the patch of label_efficiency.Arms.predict: patch_mm rounded to the patch multiple, within the volume
        patch = [min(max(m, m * round(mm / s / m)), n) for mm, s, m, n in zip(TrainSettings.patch_mm, case.spacing, multiple, padded[0].shape)]
        arms = list(LABEL_ARMS) + ([("monai_unetr_small", None)] if all(p % 16 == 0 for p in patch) else [])
        steps = [LabelStep(model, kernels, patch, case.spacing, len(TARGETS) + 1) for model, kernels in arms]
        sampler = PatchSampler(*padded, slices, patch, seed=0)
        cpu, wall = [[] for _ in arms], [[] for _ in arms]
        for i in range(args.warmup + args.steps):
            batch = sampler.batch(1)
            for step, cpu_times, wall_times in zip(steps, cpu, wall):
                start_cpu, start = time.process_time(), time.perf_counter()
                step(*batch)
                if i >= args.warmup:
                    cpu_times.append(time.process_time() - start_cpu)
                    wall_times.append(time.perf_counter() - start)
        unet_cpu = float(np.median(cpu[[model for model, _ in arms].index("monai_unet")]))
        for (model, kernels), step, cpu_times, wall_times in zip(arms, steps, cpu, wall):
            run = {
                "regime": "label_efficiency",
                "grid": grid,
                "model": model,
                "implementation": "monai" if model.startswith("monai_") else "spadkit",
                "kernels": kernels,
                "device": "cpu",
                "batch_size": 1,
                "patch": patch,
                "cpu_s_per_step": round(float(np.median(cpu_times)), 4),
                "s_per_step": round(float(np.median(wall_times)), 4),
                "steps_per_s": round(1 / float(np.median(wall_times)), 3),
                "cpu_ratio_to_monai_unet": round(float(np.median(cpu_times)) / unet_cpu, 2),
                "params_m": round(sum(p.numel() for p in step.model.parameters()) / 1e6, 2),
            }
            print(json.dumps(run), flush=True)
            runs.append(run)
    return runs


def plot(runs: Sequence[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    label = [r for r in runs if r.get("regime") == "label_efficiency"]
    runs = [r for r in runs if r.get("regime") != "label_efficiency"]
    devices = sorted({r["device"] for r in runs})
    grids = sorted({r["grid"] for r in label}, reverse=True)
    figure = Figure(figsize=(6 * (len(devices) + len(grids)), 3.6), layout="constrained")
    axes = figure.subplots(1, len(devices) + len(grids), squeeze=False)[0]
    for axis, grid in zip(axes[len(devices) :], grids):
        mine = [r for r in label if r["grid"] == grid]
        colours = ["tab:orange" if r["implementation"] == "monai" else "tab:blue" if r["kernels"] == "fast" else "tab:gray" for r in mine]
        bars = axis.barh([f"{r['model']}" + (f"\n{r['kernels']} kernels" if r["kernels"] else "") for r in mine], [r["cpu_s_per_step"] for r in mine], color=colours)
        axis.bar_label(bars, [f"{r['cpu_s_per_step']:.3f} s ({r['cpu_ratio_to_monai_unet']:.1f}x UNet)" for r in mine], padding=3)
        axis.invert_yaxis()
        axis.set_xlabel("CPU seconds per training step (lower is better)")
        axis.set_title(f"label-efficiency step, {grid} mm, batch 1, patch {'x'.join(map(str, mine[0]['patch']))}")
        axis.margins(x=0.45)
    for axis, device in zip(axes, devices):
        mine = [r for r in runs if r["device"] == device]
        labels = [f"{r['model']}\n{r['feed']}" for r in mine]
        colours = ["tab:orange" if r["implementation"] == "monai" else "tab:blue" if r["feed"] == "stream" else "tab:cyan" for r in mine]
        bars = axis.barh(labels, [r["samples_per_s"] for r in mine], color=colours)
        axis.bar_label(bars, [f"{r['samples_per_s']:.2f}" + (f" ({r['peak_memory_mb']:.0f} MB)" if r["peak_memory_mb"] else "") for r in mine], padding=3)
        axis.invert_yaxis()
        axis.set_xlabel("fine-tuning samples/s (higher is better)")
        axis.set_title(f"{device}, {mine[0]['precision']}, batch {mine[0]['batch_size']}, patch {mine[0]['patch'][0]}^3")
        axis.margins(x=0.35)
    figure.savefig(path, dpi=120)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune_speed.json"))
    parser.add_argument("--patch", type=int, default=32, help="CPU patch edge in voxels (1 mm)")
    parser.add_argument("--batch", type=int, default=2, help="CPU batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (see the module docstring)")
    parser.add_argument("--gpu-patch", type=int, default=96)
    parser.add_argument("--gpu-batch", type=int, default=4)
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--regimes", nargs="+", choices=("stream", "label"), default=["stream", "label"], help="stream: 1 mm PatchStream fine-tuning; label: the label-efficiency network step")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    warnings.filterwarnings("ignore", category=FutureWarning)
    runs = label_regime(args) if "label" in args.regimes else []
    if "stream" in args.regimes:
        with tempfile.TemporaryDirectory() as folder:
            url = annotated_store(Path(folder))
            runs += section(url, ["spad_unetr_test", "spad_unetr_small"], args, torch.device("cpu"), args.patch, args.batch)
            if torch.cuda.is_available():
                gpu = argparse.Namespace(**{**vars(args), "steps": args.gpu_steps})
                runs += section(url, ["spad_unetr_base"], gpu, torch.device("cuda"), args.gpu_patch, args.gpu_batch)
    report = {
        "runs": runs,
        "settings": {
            "machine": {
                "cpu_model": cpu_model(),
                "cpus_usable": len(os.sched_getaffinity(0)),
                "load_average_1min": round(os.getloadavg()[0], 1),
                "platform": platform.platform(),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            },
            "versions": {name: package_version(name) for name in ("torch", "monai", "lightning", "spadkit")},
            "torch_threads": args.threads,
            "data": f"MNI152 T1 1 mm, label version annotating axial slices {list(ANNOTATED_SLICES)} (gray matter > 0.5), the rest unknown",
            "sampler": "LabelSampler(0.5) restricted to annotated voxels; PatchStream with 2 reader threads",
            "cpu": {"patch": args.patch, "batch": args.batch, "warmup_steps": args.warmup, "timed_steps": args.steps},
            "gpu": {"patch": args.gpu_patch, "batch": args.gpu_batch, "timed_steps": args.gpu_steps} if torch.cuda.is_available() else "not run: no CUDA device",
            "step": "SegFinetune.loss (masked Dice + CE over annotated voxels) + backward + AdamW (SegFinetune.configure_optimizers for spadkit)",
            "monai_peer": "monai.networks.nets.UNETR with the same hidden size, MLP, heads, feature size, 12 blocks, patch 16, qkv_bias",
            "regimes": args.regimes,
            "label_regime": {
                "grids": list(LABEL_GRIDS),
                "step": "benchmarks/_label_networks.py: masked Dice + CE over annotated voxels, backward, AdamW (TrainSettings), batch 1, 32x64x64 mm patches around labelled axial slices",
                "kernels": "fast: spadkit.models.spad CPU paths (batch-1 split for oneDNN, kernel == stride as matrix products); reference: F.conv3d / F.conv_transpose3d (slow_conv3d at batch 1)",
                "monai_unet": "monai.networks.nets.UNet(3, 1, 3, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1)",
                "timing": "median over timed steps of time.process_time (cpu_s_per_step, all threads) and wall time (s_per_step); arms step in turn on the same patch",
            },
            "runtime_s": round(time.perf_counter() - started, 1),
            "command": " ".join(sys.argv),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(runs, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {report['settings']['runtime_s']} s")


if __name__ == "__main__":
    main()
