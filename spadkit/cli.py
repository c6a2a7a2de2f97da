"""The ``spadkit`` command line.

``spadkit --help`` lists the subcommands; each has its own ``--help``.
Errors about user input print the message (which names the file and the fix)
and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from spadkit import __version__
from spadkit.errors import SpadkitError


def _cmd_catalog(args: argparse.Namespace) -> int:
    from spadkit.catalog import load_catalog, validate_catalog

    if args.catalog_cmd == "validate":
        errors = validate_catalog(args.folder)
        for err in errors:
            print(f"error: {err}", file=sys.stderr)
        if errors:
            print(f"{len(errors)} invalid catalog file(s)", file=sys.stderr)
            return 1
        print(f"catalog OK: {len(load_catalog(args.folder))} entries")
        return 0
    catalog = load_catalog(args.folder)
    if args.catalog_cmd == "show":
        entry = catalog[args.name]
        if args.json:
            print(json.dumps(entry.model_dump(mode="json"), indent=2))
        else:
            for key, value in entry.model_dump(mode="json").items():
                print(f"{key:>24}: {value}")
        return 0
    entries = catalog.filter(modality=args.modality, dimensionality=args.dim, task=args.task, body_region=args.region)
    if args.json:
        print(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
        return 0
    print(f"{'name':<24} {'modality':<12} {'dim':<4} {'cases':>7}  {'task':<28} {'access':<12} region")
    for e in entries:
        tasks = ",".join(t.value for t in e.task)
        print(f"{e.name:<24} {','.join(e.modality_codes)[:12]:<12} {e.dimensionality}D   {e.num_cases or '?':>7}  {tasks:<28} {e.access:<12} {e.body_region}")
    print(f"{len(entries)} datasets")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from spadkit.catalog import load_catalog
    from spadkit.ingest import ingest

    entry = load_catalog(args.catalog_folder)[args.catalog] if args.catalog else None
    report = ingest(
        args.dataset_dir,
        args.out,
        entry=entry,
        layout=args.layout,
        modality=args.modality,
        num_workers=args.workers,
        scheduler_address=args.scheduler,
        overwrite=args.overwrite,
        repair=args.repair,
        progress=not args.quiet,
    )
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_check(args: argparse.Namespace) -> int:
    from spadkit.check import check_store

    report = check_store(args.store, deep=not args.quick)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return 0 if report.ok else 1


def volume_info(path: str) -> dict:
    """What ``spadkit info`` prints: geometry, dtype and intensity range of an image file."""
    from spadkit.io import read_volume
    from spadkit.stats import value_range

    volume = read_volume(path)
    lo, hi, nonfinite = value_range(volume.array, volume.source)  # chunk-wise; damaged chunks raise CorruptFileError
    sz, sy, sx = volume.spacing
    return {
        "path": str(path),
        "format": volume.meta.get("format"),
        "shape": dict(zip(("C", "Z", "Y", "X"), volume.shape)),
        "spacing_mm": {"Z": sz, "Y": sy, "X": sx},
        "origin_mm_ras": dict(zip("xyz", volume.origin)),
        "orientation": volume.orientation,
        "dtype": str(volume.dtype),
        "modality": volume.modality,
        "intensity_range": [float(lo), float(hi)],
        "nonfinite_voxels": int(nonfinite),
        "is_2d": volume.is_2d,
    }


def store_info(path: str) -> dict:
    """What ``spadkit info STORE.zarr`` prints: the store's dataset, cases and fingerprint."""
    from spadkit.io import OMEZarrStore

    store = OMEZarrStore(path)
    info = store.info
    return {
        "path": str(path),
        "dataset": info.get("dataset"),
        "cases": store.cases(),
        "incomplete_cases": store.incomplete_cases(),
        "damaged_cases": store.damaged_cases(),
        "fingerprint": info.get("fingerprint"),
    }


def _is_store_root(path: str) -> bool:
    return (Path(path) / "zarr.json").is_file() and not (Path(path).parent / "zarr.json").is_file()


def _cmd_info(args: argparse.Namespace) -> int:
    if _is_store_root(args.file):
        summary = store_info(args.file)
        if args.json:
            print(json.dumps(summary, indent=2))
            return 0
        fp = summary["fingerprint"] or {}
        print(f"{summary['path']}  (spadkit OME-Zarr store, dataset {summary['dataset']})")
        print(f"  cases        {len(summary['cases'])}: {', '.join(summary['cases'][:8])}{' ...' if len(summary['cases']) > 8 else ''}")
        if summary["incomplete_cases"]:
            print(f"  incomplete   {', '.join(summary['incomplete_cases'])} (re-run `spadkit ingest` to redo them)")
        for case, reason in summary["damaged_cases"].items():
            print(f"  DAMAGED      {case}: {reason} (`spadkit check` lists all problems; `spadkit ingest ... --repair` redoes them)")
        if fp:
            print(f"  spacing      median (Z, Y, X) {fp['spacing_zyx_mm']['median']} mm")
            for channel, stats in fp["intensity"].items():
                print(f"  intensity    {channel}: mean {stats['mean']:.4g}, std {stats['std']:.4g}, median p0.5..p99.5 {stats['median_case_p0.5']:.4g}..{stats['median_case_p99.5']:.4g}")
        return 0
    info = volume_info(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    spacing = ", ".join(f"{k}={v:.4g}" for k, v in info["spacing_mm"].items())
    print(f"{info['path']}  ({info['format']})")
    print(f"  shape        {', '.join(f'{k}={v}' for k, v in info['shape'].items())}{'  (2D image)' if info['is_2d'] else ''}")
    print(f"  spacing      {spacing} mm")
    print(f"  orientation  {info['orientation']} (voxel axes x, y, z)")
    print(f"  dtype        {info['dtype']}")
    print(f"  modality     {info['modality'] or 'unknown'}")
    print(f"  intensity    {info['intensity_range'][0]:.6g} .. {info['intensity_range'][1]:.6g}")
    if info["nonfinite_voxels"]:
        print(f"  WARNING      {info['nonfinite_voxels']} NaN/Inf voxels: `spadkit ingest` will refuse this file")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from spadkit.demo import Budget
    from spadkit.demo import main as run_demo

    return run_demo(args.out, pretrain=not args.no_pretrain, budget=Budget.quick() if args.quick else Budget())


def pretrain(argv: Sequence[str]) -> int:
    """``spadkit pretrain ...`` and ``spadkit finetune ...``: see :func:`spadkit.tasks.launch.run_pretrain`."""
    from spadkit.tasks.launch import run_pretrain

    return run_pretrain(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spadkit", description="Spacing-adaptive medical-image foundation models with a human in the loop.")
    parser.add_argument("--version", action="version", version=f"spadkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    catalog = sub.add_parser("catalog", help="list, show and validate the public-dataset catalog", description="The data catalog (data_catalog/*.yaml).")
    catalog.add_argument("--folder", default=None, help="catalog folder (default: the bundled one or $SPADKIT_CATALOG)")
    catalog_sub = catalog.add_subparsers(dest="catalog_cmd", required=True, metavar="ACTION")
    listing = catalog_sub.add_parser("list", help="list datasets, optionally filtered")
    listing.add_argument("--modality", help="e.g. CT, MR, PT, XR, US")
    listing.add_argument("--dim", type=int, choices=(2, 3), help="2D or 3D datasets only")
    listing.add_argument("--task", help="segmentation, classification, detection, ...")
    listing.add_argument("--region", help="body region substring, e.g. abdomen")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    show = catalog_sub.add_parser("show", help="all fields of one dataset")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    catalog_sub.add_parser("validate", help="check every entry against the schema; exit 1 on errors")
    catalog.set_defaults(func=_cmd_catalog)

    ing = sub.add_parser(
        "ingest",
        help="convert a dataset folder to an OME-Zarr store (resumable)",
        description="Convert a dataset folder (images + optional labels) into a spadkit OME-Zarr store with Dask. "
        "Re-running skips finished cases; interrupted cases are redone.",
    )
    ing.add_argument("dataset_dir", help="extracted dataset folder")
    ing.add_argument("--out", required=True, help="output store, e.g. spleen.zarr or s3://bucket/spleen.zarr")
    ing.add_argument("--catalog", help="catalog entry name (gives layout, modality, label names)")
    ing.add_argument("--catalog-folder", default=None, help="catalog folder (default: bundled)")
    ing.add_argument("--layout", choices=("msd", "nnunet", "flat", "dicom_series", "image_folder"), help="override the folder layout")
    ing.add_argument("--modality", help="modality code(s), e.g. CT or MR,MR for two channels")
    ing.add_argument("--workers", type=int, default=None, help="local threads, at least 1 (default: as many as the CPUs and the available memory allow)")
    ing.add_argument("--scheduler", default=None, help="dask.distributed scheduler address, e.g. tcp://10.0.0.1:8786")
    ing.add_argument("--overwrite", action="store_true", help="redo cases already in the store")
    ing.add_argument("--repair", action="store_true", help="read every chunk of every complete case and redo the damaged ones (see `spadkit check`)")
    ing.add_argument("--quiet", action="store_true", help="no progress bar")
    ing.set_defaults(func=_cmd_ingest)

    info = sub.add_parser("info", help="shape, spacing, orientation, dtype and intensity range of an image", description="Describe an image file, DICOM folder or store case.")
    info.add_argument("file", help="NIfTI, NRRD, DICOM file/folder, PNG/JPEG/TIFF, STORE.zarr/CASE, or a whole STORE.zarr")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)

    check = sub.add_parser(
        "check",
        help="verify every case of a store: metadata, arrays, every chunk present and decodable",
        description="Verify a spadkit OME-Zarr store case by case; exit 1 if any case is damaged or incomplete. "
        "`spadkit ingest DATASET --out STORE --repair` redoes the damaged cases.",
    )
    check.add_argument("store", help="STORE.zarr (local path or fsspec URL)")
    check.add_argument("--quick", action="store_true", help="check metadata and arrays only, do not read the chunks")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=_cmd_check)

    demo = sub.add_parser(
        "demo",
        help="run the end-to-end demo on bundled real data",
        description="Ingest bundled real volumes, pretrain the tiny SPAD-ViT, fine-tune it few-shot, run simulated annotation rounds "
        "and write demo_output/report.html (CPU, about 5-10 minutes).",
    )
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--no-pretrain", action="store_true", help="stop after ingest (skip pretraining, fine-tuning and the rounds)")
    demo.add_argument("--quick", action="store_true", help="seconds-long budget (10 pretraining steps, 4 fine-tuning steps, 2 rounds): a smoke test of every step")
    demo.set_defaults(func=_cmd_demo)

    sub.add_parser(
        "pretrain",
        add_help=False,
        help="train the tokenizer or pretrain SPAD-ViT (LightningCLI; `spadkit pretrain --help`)",
    )
    sub.add_parser(
        "finetune",
        add_help=False,
        help="fine-tune a SPAD-UNETR or classifier (LightningCLI, the finetune_* configs; `spadkit finetune --help`)",
    )
    from spadkit.active.command import add_parser as add_session_parser
    from spadkit.predict_command import add_parser as add_predict_parser

    add_predict_parser(sub)
    add_session_parser(sub)
    return parser


def _quiet_abandoned_reads() -> None:
    """Silence asyncio's shutdown report of zarr reads abandoned by a failed one.

    When one chunk of a zarr read fails, zarr's ``concurrent_map`` leaves the
    other chunk tasks pending on its background loop; at interpreter exit
    asyncio logs "Task was destroyed but it is pending!" for each, burying the
    error already printed. Only the exit path of a reported error calls this.
    """
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``spadkit ARGV``; return the exit status.

    0 success; 1 the command ran but found problems (failed cases, invalid
    catalog entries, a damaged store, output cut by a closed pipe); 2 bad
    input (the message names the file and the fix; no traceback);
    130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] in (["pretrain"], ["finetune"]):  # LightningCLI parses its own arguments
            code = pretrain(argv[1:])
        else:
            args = build_parser().parse_args(argv)
            code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler below
        return code
    except SpadkitError as err:
        print(f"error: {err}", file=sys.stderr)
        _quiet_abandoned_reads()
        return 2
    except BrokenPipeError:
        # The reader went away (`spadkit catalog list | head -1`): stop quietly. Point stdout at
        # devnull so the interpreter's final flush does not raise again (Python docs, signal module).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as err:  # missing, unreadable or unwritable files named by the user
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
