"""``spadkit session STORE CASE ACTION``: the annotation loop from a shell (one step per call, JSON out).

Every call reopens the session from the store (its corrections, split and model), so calls can be
scripted or interrupted at any point::

    spadkit session brains.zarr mni suggest --model spad_vit_small     # starts the session
    spadkit session brains.zarr mni submit --axis z --index 68 --mask slice68.npy
    spadkit session brains.zarr mni undo
    spadkit session brains.zarr mni history
    spadkit session brains.zarr mni finetune --finetune-steps 200   # full learning, headless (waits; progress on stderr)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from spadkit.errors import SpadkitError

ACTIONS = ("suggest", "submit", "undo", "redo", "history", "finetune")


def add_parser(sub: Any) -> None:
    """Register the ``session`` subcommand on an ``argparse`` subparsers object."""
    parser = sub.add_parser(
        "session",
        help="the annotation loop: suggest a slice, submit a corrected slice, undo, redo, history, finetune",
        description="One step of an annotation session on a store case; prints JSON. The first call needs --model.",
    )
    parser.add_argument("store", help="the OME-Zarr store")
    parser.add_argument("case", help="the case id")
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("--label", default="seg", help="label map the corrections are saved to (default: seg)")
    parser.add_argument("--model", help="a registered model name or a save_pretrained folder (default: the session's own)")
    parser.add_argument("--classes", type=int, default=2, help="classes incl. background when a session starts (default: 2)")
    parser.add_argument("--author", help="recorded with every version (default: the OS user)")
    parser.add_argument("--axis", choices=("z", "y", "x"), help="submit: the slice axis")
    parser.add_argument("--index", type=int, help="submit: the slice index")
    parser.add_argument("--mask", help="submit: the corrected slice as a .npy file (bool or integer labels)")
    parser.add_argument("--finetune-steps", type=int, default=200, help="finetune: optimiser steps (default: 200)")
    parser.add_argument("--device", help="finetune: cpu, cuda, cuda:N (default: the GPU when there is one)")
    parser.set_defaults(func=run)


def _open(args: argparse.Namespace) -> Any:
    from spadkit.active.session import AnnotationSession, load_saved_model
    from spadkit.io.omezarr import OMEZarrStore
    from spadkit.models import create_model, list_models

    store = OMEZarrStore(args.store, mode="r" if args.action == "history" else "a")
    if args.model is None:
        return AnnotationSession.resume(store, args.case, label_name=args.label, author=args.author)
    if Path(args.model).is_dir():
        model = load_saved_model(args.model)
    elif args.model in list_models():
        model = create_model(args.model)
    else:
        raise SpadkitError(f"unknown model {args.model!r}", fix=f"use a save_pretrained folder or one of {', '.join(list_models())}.")
    return AnnotationSession(store, args.case, model, args.label, num_classes=args.classes, author=args.author)


def run(args: argparse.Namespace) -> int:
    if args.action == "submit" and (args.axis is None or args.index is None or args.mask is None):
        raise SpadkitError("submit needs --axis, --index and --mask", fix="e.g. --axis z --index 68 --mask slice68.npy")
    session = _open(args)
    if args.action == "suggest":
        hint = session.suggest_next()
        out: Any = {"axis": "zyx"[hint.axis], "index": hint.index, "score": hint.score, "reason": hint.reason}
    elif args.action == "history":
        out = session.history()
    elif args.action == "submit":
        try:
            mask = np.load(args.mask, allow_pickle=False)
        except ValueError as error:
            raise SpadkitError(f"not a numpy .npy array ({error})", path=args.mask, fix="save the mask with numpy.save(path, mask).") from None
        out = session.submit_correction(args.axis, args.index, mask).summary()
    elif args.action == "finetune":
        out = _finetune(session, args)
    else:
        out = getattr(session, args.action)().summary()
    print(json.dumps(out, indent=1, default=str))
    return 0


def _finetune(session: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Run a full fine-tune to the end (Ctrl-C cancels it) with a progress bar on stderr; the result as a dict."""
    import dataclasses

    from tqdm import tqdm

    job = session.start_finetune(max_steps=args.finetune_steps, device=args.device)
    with tqdm(total=args.finetune_steps, desc="fine-tune", unit="step", file=sys.stderr) as bar:
        try:
            while job.running:
                state = job.progress()
                bar.update(state["step"] - bar.n)
                bar.set_postfix_str(state["message"], refresh=True)
                time.sleep(0.5)
        except KeyboardInterrupt:
            job.cancel()
    return dataclasses.asdict(job.wait())
