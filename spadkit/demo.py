"""The end-to-end demo on real data that ships with installed packages (no downloads).

:func:`main` (``spadkit demo``, ``make demo``) runs, on the CPU, with progress for each step:

1. :func:`run_demo`: builds a small dataset folder from

   * nilearn's MNI152 T1 template (1 mm isotropic, 197x233x189) with a label map
     of gray (1) and white matter (2) from nilearn's tissue probability maps,
   * the same template as a thick-slice 1x1x3 mm volume (3 slices averaged),
     stored in LPS orientation as a DICOM-minded scanner would write it,
   * pydicom's ``CT_small.dcm`` (a real 128x128 CT slice, 0.66 mm pixels, HU),

   ingests it into an OME-Zarr store with :func:`spadkit.ingest.ingest`, and
   draws a montage PNG with each case's spacing annotated;
2. :func:`pretrain_demo`: trains the tiny tokenizer and pretrains the tiny SPAD-ViT
   on that store with the bundled configs and plots the loss curves;
3. :func:`few_shot`: gray matter of the 1 mm T1 from a few labelled axial slices,
   scored on held-out axial slices: an intensity band tuned on the labelled slices
   (no learning), the light head on the pretrained features, and SPAD-UNETR
   fine-tuned from the pretrained backbone and from scratch;
4. :func:`simulate_annotation`: rounds of :class:`~spadkit.active.AnnotationSession`
   in which a simulated annotator replaces the prediction on the suggested slice
   with the truth;
5. :mod:`spadkit.demo_report`: ``report.html`` with the figures and numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from spadkit.ingest import IngestReport, ingest
from spadkit.io import OMEZarrStore, read_volume, write_nifti
from spadkit.volume import LabelVolume, Volume

if TYPE_CHECKING:
    import torch
    from torch import nn

    from spadkit.models.light_head import LightHead, VoxelFeatures

TISSUE_CLASSES = {0: "background", 1: "gray matter", 2: "white matter"}


def nilearn_file(kind: str) -> Path:
    """Path of nilearn's bundled MNI152 2009a file: ``t1``, ``gm`` or ``wm``."""
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data" / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"


def mni152_tissue_labels() -> LabelVolume:
    """Label map (0 background, 1 gray, 2 white matter) where a tissue's probability exceeds 0.5."""
    gm = read_volume(nilearn_file("gm")).numpy()[0].astype(np.float32)
    wm = read_volume(nilearn_file("wm")).numpy()[0].astype(np.float32)
    scale = max(gm.max(), wm.max())  # stored as 0..255 in some nilearn versions, 0..1 in others
    gm, wm = gm / scale, wm / scale
    labels = np.where((wm > 0.5) & (wm >= gm), 2, np.where(gm > 0.5, 1, 0)).astype(np.uint8)
    return LabelVolume(labels, read_volume(nilearn_file("gm")).affine, classes=TISSUE_CLASSES)


def thick_slices(volume: Volume, factor: int = 3) -> Volume:
    """Average ``factor`` consecutive slices along Z: a thick-slice acquisition of the same anatomy."""
    data = volume.numpy().astype(np.float32)
    z = data.shape[1] // factor * factor
    thick = data[:, :z].reshape(data.shape[0], z // factor, factor, *data.shape[2:]).mean(axis=2)
    affine = volume.affine.copy()
    affine[:3, 2] *= factor
    affine[:3, 3] += volume.affine[:3, 2] * (factor - 1) / 2  # centre of the first averaged block
    return Volume(thick.astype(np.int16), affine, modality=volume.modality)


def build_demo_dataset(folder: str | os.PathLike) -> Path:
    """Write the demo dataset (flat layout: ``images/`` + ``labels/``) and return its folder."""
    import pydicom.data

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    t1 = read_volume(nilearn_file("t1")).load()
    t1 = Volume(t1.numpy().astype(np.int16), t1.affine)
    write_nifti(t1, folder / "images" / "mni152_t1_1mm.nii.gz")
    (folder / "images" / "mni152_t1_1mm.json").write_text('{"Modality": "MR"}\n')  # BIDS/dcm2niix sidecar
    write_nifti(mni152_tissue_labels(), folder / "labels" / "mni152_t1_1mm.nii.gz")
    write_nifti(thick_slices(t1).reoriented("LPS"), folder / "images" / "mni152_t1_1x1x3mm_lps.nii.gz")
    (folder / "images" / "mni152_t1_1x1x3mm_lps.json").write_text('{"Modality": "MR"}\n')
    shutil.copy(Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm", folder / "images" / "ct_small.dcm")
    return folder


def montage(store: OMEZarrStore, path: str | os.PathLike) -> Path:
    """Save a PNG: for each case an axial and a coronal mid-slice at true physical aspect.

    Label maps are drawn as contours; titles give shape (Z, Y, X) and spacing in mm.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = store.cases()
    fig, axes = plt.subplots(len(cases), 2, figsize=(8, 3.6 * len(cases)), squeeze=False)
    for row, case_id in zip(axes, cases):
        image = store.read_image(case_id)
        data = image.numpy()[0].astype(np.float32)
        label = store.read_label(case_id).numpy()[0] if store.label_names(case_id) else None
        sz, sy, sx = image.spacing
        lo, hi = np.percentile(data, [0.5, 99.5])
        views = [
            ("axial", data[data.shape[0] // 2], None if label is None else label[label.shape[0] // 2], sy / sx),
            ("coronal", data[:, data.shape[1] // 2], None if label is None else label[:, label.shape[1] // 2], sz / sx),
        ]
        if image.is_2d:
            views = views[:1]
            row[1].text(0.5, 0.5, f"{case_id}: 2D image\n(one slice, depth treated as infinitely coarse)", ha="center", va="center", fontsize=8)
            row[1].set_axis_off()
        for ax, (view, plane, plane_label, aspect) in zip(row, views):
            # RAS storage: y (anterior) and z (superior) grow upwards on screen.
            ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect, interpolation="nearest")
            if plane_label is not None and plane_label.any():
                ax.contour(plane_label, levels=[0.5, 1.5], colors=["#ffb000", "#00c8ff"], linewidths=0.7, origin="lower")
            ax.set_title(f"{case_id} ({view})\nshape {image.spatial_shape}, spacing {sz:.3g} x {sy:.3g} x {sx:.3g} mm", fontsize=8)
            ax.set_axis_off()
    fig.suptitle(f"spadkit demo store: {store.url}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def run_demo(out: str | os.PathLike = "demo_output") -> tuple[IngestReport, Path]:
    """Build the bundled dataset, ingest it into ``out/demo.zarr`` and draw ``out/montage.png``."""
    out = Path(out)
    dataset = build_demo_dataset(out / "dataset")
    store_url = str(out / "demo.zarr")
    report = ingest(dataset, store_url, layout="flat", classes=TISSUE_CLASSES)
    picture = montage(OMEZarrStore(store_url), out / "montage.png")
    return report, picture


def pretrain_demo(out: str | os.PathLike = "demo_output", *, tokenizer_steps: int | None = None, pretrain_steps: int | None = None) -> Path:
    """Train ``spad_vt_test`` then pretrain ``spad_vit_test`` on ``out/demo.zarr``; plot ``out/pretrain_loss.png``.

    ``tokenizer_steps``/``pretrain_steps`` override the bundled configs' ``max_steps`` (400 and 600).
    """
    return _pretrain(Path(out), tokenizer_steps, pretrain_steps).plot


@dataclasses.dataclass(frozen=True)
class PretrainOutcome:
    """The loss plot, each run's ``metrics.csv``, and why MIM was switched off (None: it ran)."""

    plot: Path
    metrics: dict[str, Path]
    mim_refused: str | None


def _pretrain(out: Path, tokenizer_steps: int | None, pretrain_steps: int | None) -> PretrainOutcome:
    from spadkit.tasks.launch import run_pretrain

    refusal = None
    for config, name, steps in (("tokenizer_tiny", "tokenizer", tokenizer_steps), ("pretrain_tiny", "pretrain", pretrain_steps)):
        args = [
            "--config", config,
            f"--trainer.default_root_dir={out / 'runs' / name}",
            f"--trainer.logger.init_args.save_dir={out / 'runs'}",
            "--trainer.enable_progress_bar=true",
            f"--data.train=[{out / 'demo.zarr'}]",
            f"--model.init_args.export_dir={out / 'weights' / ('spad_vt_test' if name == 'tokenizer' else 'spad_vit_test')}",
        ]  # fmt: skip
        if steps is not None:
            args += [f"--trainer.max_steps={steps}", f"--trainer.log_every_n_steps={max(1, min(10, steps // 5))}"]
        if name == "pretrain":
            args.append(f"--model.init_args.tokenizer={out / 'weights' / 'spad_vt_test'}")
            refusal = _tokenizer_refusal(out / "weights" / "spad_vt_test")
            if refusal is not None:
                print(f"demo: pretraining without MIM. {refusal}")
                args.append("--model.init_args.mim_weight=0")  # MAE and the heads only: MIM would refuse this tokenizer
        run_pretrain(args)
    metrics = {name: out / "runs" / name / "latest" / "metrics.csv" for name in ("tokenizer", "pretrain")}
    return PretrainOutcome(plot_losses(metrics, out / "pretrain_loss.png"), metrics, refusal)


def _tokenizer_refusal(folder: Path) -> str | None:
    """Why the demo's tokenizer cannot serve MIM (it did not beat the patch-mean baseline), or None."""
    from spadkit.errors import SpadkitError
    from spadkit.models import load_pretrained
    from spadkit.tasks.pretrain import check_tokenizer_content

    try:
        check_tokenizer_content(load_pretrained(folder)[1], str(folder))
    except SpadkitError as error:
        return error.reason
    return None


def _panel(key: str) -> str | None:
    """The panel a logged ``train/`` key is drawn in: each diagnostic beside the trivial baseline it must beat."""
    if key in ("psnr", "psnr_patch_mean"):
        return "reconstruction PSNR (dB) vs patch mean"
    if key.startswith("mi_"):
        return "code information (nats)"
    if key in ("mae_textured", "mae_floor_zero"):
        return "MAE on textured tokens vs predicting zero"
    if key.startswith("mim"):
        return "MIM vs its floors (entropy, position only)"
    if key.startswith("codes_used"):
        return None  # a count (0..K): its own scale, logged in the CSV
    return "losses"


def plot_losses(runs: dict[str, Path], path: Path) -> Path:
    """One row per run; its losses and each diagnostic beside its baseline, against the step
    (raw, faint; and a 5-log running mean)."""
    import csv

    from matplotlib.figure import Figure

    curves: dict[str, dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]] = {}
    for name, metrics in runs.items():
        with open(metrics, newline="") as f:
            rows = list(csv.DictReader(f))
        panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for key in sorted(k for k in rows[0] if k.startswith("train/")):
            panel = _panel(key.removeprefix("train/"))
            points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
            if panel is not None and points:
                panels.setdefault(panel, {})[key.removeprefix("train/")] = tuple(np.array(points).T)
        curves[name] = dict(sorted(panels.items(), key=lambda item: item[0] != "losses"))
    columns = max(len(panels) for panels in curves.values())
    figure = Figure(figsize=(4.6 * columns, 3.2 * len(runs)), layout="constrained")
    grid = figure.subplots(len(runs), columns, squeeze=False)
    for row, (name, panels) in zip(grid, curves.items()):
        for axes in row[len(panels) :]:
            axes.set_visible(False)
        for axes, (panel, series) in zip(row, panels.items()):
            for label, (steps, values) in series.items():
                window = min(5, len(values))
                smooth = np.convolve(values, np.ones(window) / window, mode="valid")
                (line,) = axes.plot(steps[window - 1 :], smooth, label=label)
                axes.plot(steps, values, color=line.get_color(), alpha=0.25, linewidth=0.8)
            axes.set(title=f"{name}: {panel}", xlabel="step")
            axes.title.set_fontsize(9)
            axes.legend(fontsize=7)
    figure.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------- few-shot segmentation of the real volume
#: The case the demo segments and its target class (gray matter in :data:`TISSUE_CLASSES`).
SEG_CASE = "mni152_t1_1mm"
TARGET_CLASS = 1
#: An axial slice takes part (labelled or held out) when it holds at least this many target voxels.
MIN_TARGET_VOXELS = 500
#: Held-out slices keep at least this many slices away from a labelled one.
HELDOUT_MARGIN = 3


@dataclasses.dataclass(frozen=True)
class Budget:
    """Sizes of the demo's learning steps; :meth:`quick` is a seconds-long smoke run (tests).

    ``tokenizer_steps``/``pretrain_steps``: None keeps the bundled configs' (400 and 600).
    ``finetune_steps`` of ``finetune_batch`` crops (``crop`` x ``crop`` voxels) of the labelled slices.
    """

    tokenizer_steps: int | None = None
    pretrain_steps: int | None = None
    labelled_slices: int = 3
    heldout_slices: int = 10
    finetune_steps: int = 150
    finetune_batch: int = 4
    crop: int = 128
    rounds: int = 5

    @classmethod
    def quick(cls) -> Budget:
        return cls(tokenizer_steps=10, pretrain_steps=10, heldout_slices=3, finetune_steps=4, finetune_batch=2, crop=64, rounds=2)


@dataclasses.dataclass(frozen=True)
class SliceTask:
    """Gray matter of one case from a few labelled axial slices, scored on held-out axial slices.

    Attributes:
        image: ``(Z, Y, X)`` float32, scaled as the backbone was pretrained (store percentiles to [0, 1]).
        truth: ``(Z, Y, X)`` bool target (the tissue map's gray matter, probability > 0.5).
        spacing: ``(Z, Y, X)`` mm.
        labelled: axial slices whose truth the few-shot arms may read.
        heldout: axial slices they are scored on (none within :data:`HELDOUT_MARGIN` of a labelled one).
    """

    image: np.ndarray
    truth: np.ndarray
    spacing: tuple[float, float, float]
    labelled: tuple[int, ...]
    heldout: tuple[int, ...]

    def mask(self, slices: Sequence[int]) -> np.ndarray:
        """``(Z, Y, X)`` bool: the voxels of the given axial slices."""
        mask = np.zeros(self.truth.shape, bool)
        mask[list(slices)] = True
        return mask


def slice_task(store: OMEZarrStore, backbone: nn.Module, labelled: int = 3, heldout: int = 10) -> SliceTask:
    """The demo's task on :data:`SEG_CASE`: ``labelled`` slices evenly spread over the brain, ``heldout`` slices
    evenly spread over the rest."""
    from spadkit.active.features_cache import normalised_image

    image, spacing = normalised_image(store, SEG_CASE, backbone)
    truth = store.read_label(SEG_CASE).numpy()[0] == TARGET_CLASS
    rows = np.flatnonzero(truth.sum(axis=(1, 2)) >= MIN_TARGET_VOXELS)
    chosen = np.round(np.linspace(rows[0], rows[-1], labelled + 2)[1:-1]).astype(int)
    rest = np.array([z for z in rows if np.abs(chosen - z).min() > HELDOUT_MARGIN])
    held = rest[np.round(np.linspace(0, len(rest) - 1, heldout)).astype(int)]
    return SliceTask(image[0], truth, spacing, tuple(int(z) for z in chosen), tuple(int(z) for z in held))


def foreground_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two bool arrays (1.0 when both are empty)."""
    total = int(pred.sum()) + int(truth.sum())
    return 2.0 * int((pred & truth).sum()) / total if total else 1.0


def intensity_band(image: np.ndarray, truth: np.ndarray, mask: np.ndarray, centres: int = 32) -> tuple[float, float]:
    """The intensity band ``[lo, hi]`` whose voxels best match ``truth`` (Dice) on the voxels of ``mask``:
    the trivial, learning-free baseline (gray matter lies between CSF and white matter on T1)."""
    from spadkit.probe import best_dice

    values, target = image[mask], truth[mask]
    best = (-1.0, 0.0, 0.0)
    for centre in np.quantile(values[target], np.linspace(0.02, 0.98, centres)):
        threshold, score = best_dice(-np.abs(values - centre), target)  # inside the band: |v - centre| <= -threshold
        if score > best[0]:
            best = (score, float(centre + threshold), float(centre - threshold))
    return best[1], best[2]


def _crop_batches(task: SliceTask, steps: int, batch: int, crop: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches of random ``crop`` x ``crop`` crops of the labelled slices, as 2D images ``(B, 1, 1, crop, crop)``."""
    import torch

    rng = np.random.default_rng(seed)
    _, ny, nx = task.image.shape
    batches = []
    for _ in range(steps):
        zs = rng.choice(task.labelled, batch)
        ys, xs = rng.integers(0, ny - crop + 1, batch), rng.integers(0, nx - crop + 1, batch)
        boxes = [(z, slice(y, y + crop), slice(x, x + crop)) for z, y, x in zip(zs, ys, xs)]
        batches.append({
            "image": torch.from_numpy(np.stack([task.image[b] for b in boxes])[:, None, None].copy()),
            "label": torch.from_numpy(np.stack([task.truth[b] for b in boxes])[:, None, None].astype(np.int64)),
            "spacing": torch.tensor([task.spacing] * batch, dtype=torch.float64),
        })  # fmt: skip
    return batches


def finetune_slices(task: SliceTask, backbone: str | None, folder: Path, budget: Budget, seed: int = 0) -> nn.Module:
    """Fine-tune ``spad_unetr_test`` (all weights) with :class:`~spadkit.tasks.SegFinetune` on the labelled slices.

    Each labelled slice is a 2D image: the same weights segment it with depth treated as infinitely
    coarse, and a 2D step costs a fraction of a 3D one on a CPU. Lightning shows the progress; the
    losses go to ``folder/latest/metrics.csv``. Returns the fine-tuned model in eval mode.
    """
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from spadkit.tasks import SegFinetune

    L.seed_everything(seed, verbose=False)
    batches = _crop_batches(task, budget.finetune_steps, budget.finetune_batch, budget.crop, seed)
    module = SegFinetune(model="spad_unetr_test", num_classes=2, backbone=backbone, lr=2e-3, warmup_steps=min(10, budget.finetune_steps))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=budget.finetune_steps,
        logger=CSVLogger(folder.parent, name=folder.name, version="latest"),
        log_every_n_steps=max(1, min(5, budget.finetune_steps // 5)),
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return module.model.eval()


def predict_slices(model: nn.Module, task: SliceTask, slices: Sequence[int], crop: int) -> np.ndarray:
    """Target probability ``(n, Y, X)`` of ``model`` on axial ``slices``, each predicted as a 2D image in
    ``crop`` x ``crop`` windows: the training crop, so the ViT sees the token grid it was fine-tuned on."""
    from spadkit.infer import predict

    return np.stack([np.asarray(predict(model, task.image[None, z : z + 1], task.spacing, window=(1, crop, crop)).probs)[TARGET_CLASS, 0] for z in slices])


def light_head_slices(features: VoxelFeatures, head: LightHead, slices: Sequence[int]) -> np.ndarray:
    """Target probability ``(n, Y, X)`` of a light head on axial ``slices``."""
    from spadkit.models.light_head import predict_light_head

    return np.stack([predict_light_head(head, features, (slice(z, z + 1),))[TARGET_CLASS, 0].numpy() for z in slices])



@dataclasses.dataclass(frozen=True)
class Arm:
    """One few-shot method: its target probability ``(n, Y, X)`` on the held-out slices, their Dice (at 0.5,
    pooled over the slices) and how it was made."""

    name: str
    probs: np.ndarray
    dice: float
    note: str


def few_shot(store: OMEZarrStore, weights: Path, out: Path, budget: Budget) -> tuple[SliceTask, list[Arm]]:
    """Every few-shot arm on the same labelled and held-out slices: the intensity band (no learning), the
    light head on the pretrained backbone's cached features, and SPAD-UNETR fine-tuned from the pretrained
    backbone and from scratch."""
    from spadkit.active import features_cache as cache
    from spadkit.models.light_head import fit_light_head

    backbone = _backbone(weights)
    task = slice_task(store, backbone, budget.labelled_slices, budget.heldout_slices)
    labelled = task.mask(task.labelled)
    lo, hi = intensity_band(task.image, task.truth, labelled)
    held, truth = task.image[list(task.heldout)], task.truth[list(task.heldout)]

    def arm(name: str, probs: np.ndarray, note: str) -> Arm:
        return Arm(name, probs, foreground_dice(probs >= 0.5, truth), note)

    arms = [arm("intensity band", ((held >= lo) & (held <= hi)).astype(np.float32), f"voxels with intensity in [{lo:.3f}, {hi:.3f}], the band with the best Dice on the labelled slices")]
    features, _ = cache.load_or_extract(store, SEG_CASE, backbone, task.image[None], task.spacing, cache.model_hash(backbone))
    head = fit_light_head(features, task.truth.astype(np.int64), labelled, num_classes=2)
    arms.append(arm("light head", light_head_slices(features, head, task.heldout), "an MLP on the frozen pretrained backbone's token features and intensity features, fitted in about a second"))
    for name, backbone_dir in (("SPAD-UNETR, pretrained", str(weights)), ("SPAD-UNETR, from scratch", None)):
        model = finetune_slices(task, backbone_dir, out / "runs" / ("finetune" if backbone_dir else "finetune_scratch"), budget)
        origin = "the demo's pretrained backbone" if backbone_dir else "random init"
        arms.append(arm(name, predict_slices(model, task, task.heldout, budget.crop), f"spad_unetr_test from {origin}, all weights trained {budget.finetune_steps} steps on crops of the labelled slices"))
    return task, arms


def _backbone(weights: Path) -> nn.Module:
    from spadkit.models import create_model

    return create_model("spad_vit_test", pretrained=str(weights))


def continue_commands(out: Path) -> dict[str, str]:
    """The commands to go on from the demo's output, with this environment's executables."""
    bin_dir = Path(sys.executable).parent
    with contextlib.suppress(ValueError):  # outside the working folder: keep it absolute
        bin_dir = bin_dir.relative_to(Path.cwd())
    case = out / "demo.zarr" / SEG_CASE
    return {
        "napari": f"{bin_dir / 'napari'} --plugin spadkit {case}",
        "JupyterLab": f"{bin_dir / 'jupyter'} lab notebooks/",
        "annotation session": f"{bin_dir / 'spadkit'} session {out / 'demo.zarr'} {SEG_CASE} suggest --label {SESSION_LABEL}",
    }

# ---------------------------------------------------------------------- simulated annotation rounds
#: The label map the demo's annotation session writes (the ingested tissue map stays ``seg``).
SESSION_LABEL = "demo_gm"


@dataclasses.dataclass
class AnnotationRound:
    """One simulated round: the suggested slice, what the annotator saw and corrected, and the scores after it.

    ``image``, ``shown``, ``uncertainty`` (nats) and ``truth`` are the ``(rows, cols)`` slice before the
    correction (``shown`` is the prediction the annotator replaced); ``heldout_dice`` is the session's light
    head and ``band_dice`` the intensity band tuned on the same reviewed voxels, both on the held-out slices'
    voxels no correction reviewed.
    """

    axis: int
    index: int
    reason: str
    image: np.ndarray
    shown: np.ndarray
    uncertainty: np.ndarray
    truth: np.ndarray
    edit_dice: float | None
    voxels_changed: int
    validation_dice: float | None
    heldout_dice: float
    band_dice: float
    refresh_s: float

    def summary(self) -> dict[str, Any]:
        """The numbers of the round (no arrays)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not isinstance(getattr(self, f.name), np.ndarray)}


def simulate_annotation(store: OMEZarrStore, backbone: nn.Module, task: SliceTask, rounds: int) -> Iterator[AnnotationRound]:
    """Run ``rounds`` rounds of :class:`~spadkit.active.AnnotationSession` on :data:`SEG_CASE` (label
    :data:`SESSION_LABEL`): each round the simulated annotator replaces the prediction on the suggested slice
    with the truth. Yields each round as it finishes."""
    from spadkit.active import AnnotationSession

    session = AnnotationSession(store, SEG_CASE, backbone, SESSION_LABEL, num_classes=2, author="spadkit demo (simulated annotator)")
    heldout = list(task.heldout)
    for _ in range(rounds):
        hint = session.suggest_next()
        region = tuple(slice(hint.index, hint.index + 1) if a == hint.axis else slice(None) for a in range(3))
        shown = session.predict(region)
        truth = np.take(task.truth, hint.index, axis=hint.axis)
        done = session.submit_correction(hint.axis, hint.index, truth)
        scored = ~session.annotated[heldout]  # a sagittal or coronal correction crosses the held-out slices
        target, image = task.truth[heldout][scored], task.image[heldout][scored]
        lo, hi = intensity_band(task.image, task.truth, session.annotated)
        pred = light_head_slices(session.features, session.head, heldout)[scored] >= 0.5
        yield AnnotationRound(
            axis=hint.axis,
            index=hint.index,
            reason=hint.reason,
            image=np.take(task.image, hint.index, axis=hint.axis),
            shown=np.take(shown.labels, 0, axis=hint.axis) == TARGET_CLASS,
            uncertainty=np.take(shown.uncertainty, 0, axis=hint.axis),
            truth=truth,
            edit_dice=done.edit_dice,
            voxels_changed=done.voxels_changed,
            validation_dice=done.validation_dice,
            heldout_dice=foreground_dice(pred, target),
            band_dice=foreground_dice((image >= lo) & (image <= hi), target),
            refresh_s=done.timings["refresh_s"],
        )


# ---------------------------------------------------------------------- the whole demo
class _Steps:
    """Numbered, timed steps: prints each as it starts and ends; wall and process CPU seconds, load average."""

    def __init__(self, total: int):
        self.total, self.records = total, []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"\n[{len(self.records) + 1}/{self.total}] {name}", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        record = {"step": name, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "load_average": os.getloadavg()[0]}
        self.records.append(record)
        print(f"[{len(self.records)}/{self.total}] {name}: {record['wall_s']:.0f} s (process CPU {record['cpu_s']:.0f} s, load average {record['load_average']:.1f})", flush=True)


def main(out: str | os.PathLike = "demo_output", *, pretrain: bool = True, budget: Budget = Budget()) -> int:
    """``spadkit demo``: ingest, pretrain, few-shot fine-tuning, simulated annotation rounds, then
    ``out/report.html``; prints the commands to continue in napari and JupyterLab. Returns the exit status.

    ``pretrain=False`` stops after ingest (``spadkit demo --no-pretrain``).
    """
    from spadkit import demo_report
    from spadkit.active.session import torch_threads

    out = Path(out)
    steps = _Steps(5 if pretrain else 1)
    with steps("build the dataset from bundled files and ingest it"):
        report, picture = run_demo(out)
    print(report.summary())
    print(f"montage: {picture}")
    if not report.ok or not pretrain:
        return 0 if report.ok else 1
    with steps("train the tiny tokenizer, then pretrain the tiny SPAD-ViT"):
        pretrained = _pretrain(out, budget.tokenizer_steps, budget.pretrain_steps)
    results: dict[str, Any] = {"pretrain": demo_report.pretrain_summary(pretrained.metrics, pretrained.mim_refused)}
    store = OMEZarrStore(str(out / "demo.zarr"), mode="a")
    weights = out / "weights" / "spad_vit_test"
    # Small 2D convolutions and the light head: one torch thread. On the shared 2-core machine two threads made a
    # 96x96 forward of spad_unetr_test 15-30x slower (1.9-3.7 s vs 0.13 s) and there is little to gain on idle cores.
    with steps(f"few-shot segmentation of gray matter from {budget.labelled_slices} labelled axial slices"), torch_threads(1):
        task, fewshot = few_shot(store, weights, out, budget)
    results["fewshot"] = demo_report.fewshot_figures(task, fewshot, out)
    with steps(f"{budget.rounds} simulated annotation rounds (AnnotationSession)"), torch_threads(1):
        rounds = list(tqdm(simulate_annotation(store, _backbone(weights), task, budget.rounds), total=budget.rounds, desc="annotation rounds", unit="round"))
    results["rounds"] = demo_report.rounds_figures(rounds, results["fewshot"], out)
    with steps("write the report"):
        results["steps"] = steps.records
        page = demo_report.write_report(out, results, continue_commands(out))
    print(f"\nreport: {page}  (open it in a browser)")
    print("Continue:")
    for what, command in continue_commands(out).items():
        print(f"  {what:<22} {command}")
    return 0
