"""The end-to-end demo on real data that ships with installed packages (no downloads).

``run_demo(out)`` builds a small dataset folder from

* nilearn's MNI152 T1 template (1 mm isotropic, 197x233x189) with a label map
  of gray (1) and white matter (2) from nilearn's tissue probability maps,
* the same template as a thick-slice 1x1x3 mm volume (3 slices averaged),
  stored in LPS orientation as a DICOM-minded scanner would write it,
* pydicom's ``CT_small.dcm`` (a real 128x128 CT slice, 0.66 mm pixels, HU),

ingests it into an OME-Zarr store with :func:`spadkit.ingest.ingest`, and
draws a montage PNG with each case's spacing annotated.

``pretrain_demo(out)`` then trains the tiny tokenizer and pretrains the tiny
SPAD-ViT on that store with the bundled configs (a few minutes on a CPU) and
plots the loss curves.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from spadkit.ingest import IngestReport, ingest
from spadkit.io import OMEZarrStore, read_volume, write_nifti
from spadkit.volume import LabelVolume, Volume

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


def pretrain_demo(out: str | os.PathLike = "demo_output") -> Path:
    """Train ``spad_vt_test`` then pretrain ``spad_vit_test`` on ``out/demo.zarr``; plot ``out/pretrain_loss.png``."""
    from spadkit.tasks.launch import run_pretrain

    out = Path(out)
    for config, name in (("tokenizer_tiny", "tokenizer"), ("pretrain_tiny", "pretrain")):
        args = [
            "--config", config,
            f"--trainer.default_root_dir={out / 'runs' / name}",
            f"--trainer.logger.init_args.save_dir={out / 'runs'}",
            f"--data.train=[{out / 'demo.zarr'}]",
            f"--model.init_args.export_dir={out / 'weights' / ('spad_vt_test' if name == 'tokenizer' else 'spad_vit_test')}",
        ]  # fmt: skip
        if name == "pretrain":
            args.append(f"--model.init_args.tokenizer={out / 'weights' / 'spad_vt_test'}")
            if not _tokenizer_usable(out / "weights" / "spad_vt_test"):
                args.append("--model.init_args.mim_weight=0")  # MAE and the heads only: MIM would refuse this tokenizer
        run_pretrain(args)
    return plot_losses({name: out / "runs" / name / "latest" / "metrics.csv" for name in ("tokenizer", "pretrain")}, out / "pretrain_loss.png")


def _tokenizer_usable(folder: Path) -> bool:
    """Whether the demo's tokenizer beat the patch-mean baseline; if not, say so (MIM is then skipped)."""
    from spadkit.errors import SpadkitError
    from spadkit.models import load_pretrained
    from spadkit.tasks.pretrain import check_tokenizer_content

    try:
        check_tokenizer_content(load_pretrained(folder)[1], str(folder))
    except SpadkitError as error:
        print(f"demo: pretraining without MIM. {error}")
        return False
    return True


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
