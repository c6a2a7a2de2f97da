"""``spadkit predict``: segment a store case or an image file with a fine-tuned model.

::

    spadkit predict brains.zarr/mni --model runs/finetune/export          # label groups pred + uncertainty
    spadkit predict t1.nii.gz --model last.ckpt --out predictions/ --flips  # NIfTI files
    spadkit predict brains.zarr/mni --model runs/finetune/export --region 40:48  # refresh a slab

A store case gets two new label versions, ``pred`` (the label map) and ``uncertainty``
(0..100 % of its maximum), whose version message records the model and the checkpoint's
SHA-256 (:func:`spadkit.infer.save_prediction`); napari-ome-zarr and the spadkit napari
plugin show both. ``--out DIR`` writes ``DIR/<name>_pred.nii.gz`` (uint8 labels) and
``DIR/<name>_uncertainty.nii.gz`` (float32: nats, or a variance) on the input's RAS grid
instead. The image is read window by window and normalised as the model was pretrained
(:mod:`spadkit.normalise`).

``--region Z0:Z1[,Y0:Y1,X0:X1]`` predicts only that box (numpy slice syntax; ``40:48`` is
the axial slab of slices 40..47) and saves it on top of the latest saved prediction (or
``--base-version``): the new versions equal that prediction outside the box and are
written copy-on-write, only the chunks the box touches. A case without a saved
prediction is refused before anything runs: predict the whole volume first.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from spadkit.errors import SpadkitError


def add_parser(sub: Any) -> None:
    """Register the ``predict`` subcommand on an ``argparse`` subparsers object."""
    parser = sub.add_parser(
        "predict",
        help="segment a store case or an image file with a fine-tuned model (labels + uncertainty)",
        description="Sliding-window prediction with Gaussian blending and optional flip TTA or MC dropout; writes label groups "
        "pred and uncertainty into the store, or NIfTI files with --out.",
    )
    parser.add_argument("input", help="STORE.zarr/CASE, or an image file (NIfTI, NRRD, DICOM folder)")
    parser.add_argument("--model", required=True, help="a save_pretrained folder (a fine-tune's export_dir) or a Lightning .ckpt of spadkit finetune")
    parser.add_argument("--out", help="write NIfTI files into this folder instead of label groups into the store (required for image files)")
    parser.add_argument("--flips", action="store_true", help="test-time augmentation: average over all axis flips")
    parser.add_argument("--uncertainty", choices=("entropy", "flip_variance", "mc_dropout"), default=None, help="default: entropy (mc_dropout with --mc-dropout)")
    parser.add_argument("--mc-dropout", type=float, default=None, metavar="RATE", help="keep channel dropout of this rate active and sample (Monte-Carlo dropout)")
    parser.add_argument("--mc-samples", type=int, default=8, help="stochastic passes per window with --mc-dropout (default: 8)")
    parser.add_argument("--overlap", type=float, default=0.25, help="window overlap in [0, 1) (default: 0.25, MONAI's)")
    parser.add_argument("--window", type=int, nargs=3, metavar=("Z", "Y", "X"), help="window in voxels (default: 6 tokens per axis at the image's spacing)")
    parser.add_argument("--region", type=parse_region, help="predict only this box, e.g. 40:48 (axial slices 40..47) or 40:48,:,10:90; saved over the previous prediction")
    parser.add_argument("--base-version", type=int, help="with --region: the pred version to refresh (default: the latest)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def parse_region(spec: str) -> tuple[slice, ...]:
    """``"40:48"`` -> ``(slice(40, 48),)``; ``"40:48,:,10:90"`` -> three slices (``Z, Y, X``; empty bounds mean the edge).

    Raises:
        argparse.ArgumentTypeError: not 1-3 comma-separated ``start:stop`` ranges of integers.
    """
    axes = spec.split(",")
    if not 1 <= len(axes) <= 3 or not all(re.fullmatch(r"\s*-?\d*\s*:\s*-?\d*\s*", axis) for axis in axes):
        raise argparse.ArgumentTypeError(f"{spec!r} is not 1-3 ranges like 40:48 or 40:48,:,10:90 (z, y, x)")
    return tuple(slice(*(int(bound) if bound.strip() else None for bound in axis.split(":"))) for axis in axes)


def load_segmenter(path: str | Path) -> nn.Module:
    """A segmentation model from a ``save_pretrained`` folder or a ``spadkit finetune`` checkpoint (``.ckpt``).

    Both are read with ``weights_only=True``. A folder rebuilds the architecture its ``pretrained_cfg.json``
    names with its ``in_chans`` and fine-tuned ``num_classes``; a checkpoint rebuilds from its hyperparameters.

    Raises:
        SpadkitError: neither a folder nor a checkpoint of ``spadkit finetune``.
    """
    from spadkit.models import create_model
    from spadkit.models.registry import CFG_FILE, PretrainedCfg, load_state_dict

    path = Path(path)
    if path.is_dir():
        cfg_file = path / CFG_FILE
        if not cfg_file.is_file():
            raise SpadkitError("not a save_pretrained folder", path=path, fix="point --model at a fine-tune's export_dir (model.pt + pretrained_cfg.json) or a .ckpt.")
        return create_model(PretrainedCfg.from_json(cfg_file.read_text(), cfg_file).architecture, pretrained=str(path))
    if not path.is_file():
        raise SpadkitError("no such model", path=path, fix="point --model at a save_pretrained folder or a .ckpt file.")
    hparams = load_state_dict(path).get("hyper_parameters", {})
    if not isinstance(hparams.get("model"), str) or "num_classes" not in hparams:
        raise SpadkitError("not a checkpoint of spadkit finetune (no model/num_classes hyperparameters)", path=path, fix="pass the export folder or a .ckpt written by `spadkit finetune`.")
    from spadkit.tasks.finetune import load_weights

    model = create_model(hparams["model"], num_classes=int(hparams["num_classes"]), in_chans=int(hparams.get("in_chans", 1)))
    load_weights(model, path)
    return model


def _read_input(spec: str) -> tuple[Any, Any, str, Any]:
    """``(store or None, case id or None, output stem, (Volume, intensity stats))`` of a store case or a file."""
    from spadkit.io import OMEZarrStore, read_volume
    from spadkit.stats import intensity_stats

    match = re.fullmatch(r"(.+\.zarr)/+([^/]+)/?", spec)
    if match:
        store = OMEZarrStore(match.group(1), mode="a")
        case_id = match.group(2)
        if case_id not in store:
            raise SpadkitError(f"the store has no case {case_id!r}", path=match.group(1), fix=f"cases: {', '.join(store.cases()[:10]) or 'none'}.")
        stats = store.case_attrs(case_id).get("intensity") or intensity_stats(store.read_image(case_id).array, source=spec)
        return store, case_id, case_id, (store.read_image(case_id), stats)
    volume = read_volume(spec).canonical()
    stem = re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.dcm)$", "", Path(spec).name) or "image"
    return None, None, stem, (volume, intensity_stats(volume.array, source=spec))


def _set_mc_dropout(model: nn.Module, rate: float) -> None:
    dropout = getattr(model, "dropout", None)
    if not isinstance(dropout, nn.Dropout3d) or not 0.0 < rate < 1.0:
        raise SpadkitError(f"--mc-dropout {rate}: the model has no decoder dropout or the rate is outside (0, 1)", fix="use a SPAD-UNETR model and a rate such as 0.1.")
    dropout.p = rate


def _save_nifti(folder: Path, stem: str, volume: Any, prediction: Any) -> list[str]:
    from spadkit.io.nifti import write_nifti
    from spadkit.volume import Volume

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, data in (("pred", np.asarray(prediction.labels, np.uint8)), ("uncertainty", np.asarray(prediction.uncertainty, np.float32))):
        path = folder / f"{stem}_{suffix}.nii.gz"
        write_nifti(Volume(data[None], volume.affine), path)
        written.append(str(path))
    return written


def run(args: argparse.Namespace) -> int:
    from spadkit.infer import predict, previous_prediction, save_prediction
    from spadkit.normalise import NormalisedArray, is_signed, percentile_windows

    store, case_id, stem, (volume, stats) = _read_input(args.input)
    if store is None and not args.out:
        raise SpadkitError("an image file needs --out", path=args.input, fix="add --out FOLDER (NIfTI files are written there), or ingest it into a store first.")
    if (args.region is not None or args.base_version is not None) and args.out:
        raise SpadkitError("--region saves into the store over a previous prediction, not into files", path=args.input, fix="drop --out, or drop --region to write whole-volume NIfTI files.")
    uncertainty = args.uncertainty or ("mc_dropout" if args.mc_dropout is not None else "entropy")
    base = None
    if args.region is not None:  # refuse before predicting
        base = previous_prediction(store, case_id, args.base_version, uncertainty)["pred"]
    model = load_segmenter(args.model)
    if args.mc_dropout is not None:
        _set_mc_dropout(model, args.mc_dropout)
    image = NormalisedArray(volume.array, percentile_windows(stats), signed=is_signed(model))
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"predict {stem}", unit="window")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        prediction = predict(
            model,
            image,
            volume.spacing,
            window=args.window,
            overlap=args.overlap,
            flips=args.flips,
            uncertainty=uncertainty,
            mc_samples=args.mc_samples,
            region=args.region,
            batch_size=args.batch_size,
            device=args.device,
            progress=progress if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    summary: dict[str, Any] = {"input": args.input, "model": str(args.model), "windows": prediction.windows, "uncertainty": uncertainty}
    if args.out:
        summary["files"] = _save_nifti(Path(args.out), stem, volume, prediction)
    else:
        checkpoint = Path(args.model) / "model.pt" if Path(args.model).is_dir() else Path(args.model)
        summary["versions"] = save_prediction(store, case_id, prediction, checkpoint=checkpoint, model_name=model.pretrained_cfg.architecture, base_version=base)
        if base is not None:
            summary["region"] = [[b.start, b.stop] for b in prediction.region]
            entries = {name: {e["version"]: e for e in store.label_versions(case_id, name)}[number] for name, number in summary["versions"].items()}
            summary["chunks_written"] = {name: entry["chunks_written"] for name, entry in entries.items()}
    summary["classes"] = {int(k): int(v) for k, v in zip(*np.unique(np.asarray(prediction.labels), return_counts=True))}
    print(json.dumps(summary, indent=2))
    return 0
