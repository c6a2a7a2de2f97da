"""Timings of the annotation loop (not a test): ``python benchmarks/annotation_session.py [--model spad_vit_small]``.

Measures, on the MNI152 T1 (189, 233, 197) in a fresh tmp store: the session start-up (feature
extraction, then from the cache), and per correction of a suggested slice the save, the light-head
fit and the re-prediction of the visible slice (medians over --rounds); then the save of a
one-slice correction of a 512x512x300 label (time, and the bytes and chunks the copy-on-write version wrote).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _mni_store import CASE, mni_store

from spadkit.active import AnnotationSession
from spadkit.io.omezarr import OMEZarrStore
from spadkit.models import create_model
from spadkit.volume import LabelVolume, Volume


def loop_timings(model_name: str, rounds: int, root: Path) -> dict:
    store, truth = mni_store(root)
    torch.manual_seed(0)
    model = create_model(model_name)
    first = AnnotationSession(store, CASE, model, "seg")
    cached = AnnotationSession(store, CASE, model, "seg")
    session, rows = cached, []
    for _ in range(rounds):
        hint = session.suggest_next()
        t = time.perf_counter()
        session.suggest_next()
        suggest_s = time.perf_counter() - t
        session.predict(tuple(slice(hint.index, hint.index + 1) if a == hint.axis else slice(None) for a in range(3)))
        result = session.submit_correction(hint.axis, hint.index, np.take(truth, hint.index, axis=hint.axis))
        rows.append({**result.timings, "suggest_s": suggest_s, "validation_dice": result.validation_dice, "edit_dice": result.edit_dice})
    median = {k: statistics.median(r[k] for r in rows) for k in ("save_s", "fit_s", "predict_s", "learn_s", "refresh_s", "suggest_s")}
    return {"model": model_name, "startup": first.startup, "startup_cached": cached.startup, "median": median, "rounds": rows}


def big_save(root: Path, shape: tuple[int, int, int] = (300, 512, 512)) -> dict:
    store = OMEZarrStore(str(root / "big.zarr"), mode="a")
    image = Volume(np.zeros((1, *shape), np.int16), modality="CT")
    store.write_case("big", image)
    label = np.zeros(shape, np.int32)
    store.save_label("big", LabelVolume(label, image.affine), "seg")
    label[150, 100:300, 100:300] = 1
    t = time.perf_counter()
    store.save_label("big", LabelVolume(label, image.affine), "seg", message="one slice")
    seconds = time.perf_counter() - t
    entry = store.label_versions("big", "seg")[-1]
    return {"shape": shape, "save_s": seconds, "bytes_written": entry["bytes_written"], "chunks_written": entry["chunks_written"], "chunks_shared": entry["chunks_shared"], "slice_voxels_changed": 200 * 200}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="spad_vit_small")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-big", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = {"threads": args.threads, "load_average": os.getloadavg(), "loop": loop_timings(args.model, args.rounds, Path(tmp))}
        if not args.skip_big:
            out["big_save"] = big_save(Path(tmp))
        out["load_average_end"] = os.getloadavg()
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
