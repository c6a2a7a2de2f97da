"""Sliding-window inference: ``spadkit.infer.predict`` side by side with MONAI, and its memory on a large Zarr CT.

Speed. The same SPAD-UNETR (random weights: speed does not depend on them) predicts the
197x233x189 MNI152 T1 (1 mm) through

* ``monai``: ``monai.inferers.sliding_window_inference`` on the in-memory tensor
  (``mode="gaussian"``, ``sigma_scale=0.125``, softmax inside the predictor), the
  window and overlap of spadkit's default (6x6x6 tokens = 96^3 voxels, 0.25);
* ``spadkit``: ``spadkit.infer.predict`` on the same array (same windows and weights:
  the probabilities agree to 1e-6, checked here too), which also produces the label
  map and the entropy, and ``spadkit_zarr``: the same reading the image window by
  window from a chunked Zarr array.

Repeats alternate the three; the JSON keeps every repeat and the median ratio
``monai / spadkit`` (> 1: spadkit faster).

Memory. A synthetic 512x512x``--ct-depth`` int16 CT is written to a chunked Zarr array;
a child process (fresh ``ru_maxrss``) predicts it lazily with outputs written into Zarr
arrays (``out=``), and reports its peak RSS above the RSS before prediction, against the
volume's float32 size. The network there is ``--ct-model`` (default: a 1x1x1 convolution,
so that the run measures the pipeline's memory in minutes on a CPU; pass
``spad_unetr_test`` for a real network).

    python benchmarks/inference.py --out benchmarks/results/inference.json

JSON: ``{"speed": [{"repeat": int, "engine": "monai"|"spadkit"|"spadkit_zarr", "seconds": float}],
"speed_ratio_monai_over_spadkit": float, "memory": {...}, "settings": {...}}`` + a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._machine import cpu_model, package_version


class PointwiseSegmenter(nn.Module):
    """A 1x1x1 convolution to ``num_classes`` logits: the cheapest model with SPAD-UNETR's interface."""

    in_chans = 1

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.conv = nn.Conv3d(1, num_classes, 1)

    def forward(self, x: torch.Tensor, spacing: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def mni_image() -> tuple[np.ndarray, tuple[float, float, float]]:
    """The MNI152 T1 as ``(1, Z, Y, X)`` float32 in [0, 1] and its spacing."""
    from spadkit.demo import nilearn_file
    from spadkit.io import read_volume

    volume = read_volume(nilearn_file("t1"))
    data = volume.numpy().astype(np.float32)
    return (data - data.min()) / (data.max() - data.min()), volume.spacing


def speed(model_name: str, repeats: int, threads: int) -> tuple[list[dict], dict]:
    import zarr
    from monai.inferers import sliding_window_inference

    from spadkit.infer import default_window, predict
    from spadkit.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    image, spacing = mni_image()
    window = default_window(image.shape[1:], spacing)
    spacing_t = torch.tensor(spacing)
    folder = tempfile.mkdtemp(prefix="spadkit-infer-")
    lazy = zarr.create_array(f"{folder}/t1.zarr", shape=image.shape, chunks=(1, 32, 64, 64), dtype="float32")
    lazy[:] = image

    def run_monai() -> np.ndarray:
        with torch.no_grad():
            return sliding_window_inference(torch.from_numpy(image)[None], window, 1, lambda w: model(w, spacing_t).softmax(1), overlap=0.25, mode="gaussian")[0].numpy()

    engines = {"monai": run_monai, "spadkit": lambda: predict(model, image, spacing).probs, "spadkit_zarr": lambda: predict(model, lazy, spacing).probs}
    runs, outputs = [], {}
    for repeat in range(repeats):
        for engine, call in engines.items():
            start = time.perf_counter()
            outputs[engine] = call()
            runs.append({"repeat": repeat, "engine": engine, "seconds": time.perf_counter() - start})
            print(f"  repeat {repeat} {engine:13s} {runs[-1]['seconds']:.2f} s", flush=True)
    agreement = float(np.abs(outputs["monai"] - outputs["spadkit"]).max())
    return runs, {"window": list(window), "overlap": 0.25, "shape_zyx": list(image.shape[1:]), "max_abs_prob_difference": agreement}


def memory_child(depth: int, model_name: str, threads: int) -> dict:
    """Run in a fresh process: write the synthetic CT to Zarr, predict it lazily, report peak RSS."""
    import zarr

    from spadkit.infer import predict
    from spadkit.models import create_model

    torch.set_num_threads(threads)
    shape = (depth, 512, 512)
    folder = tempfile.mkdtemp(prefix="spadkit-ct-")
    root = zarr.open_group(f"{folder}/ct.zarr", mode="w")
    ct = root.create_array("image", shape=(1, *shape), chunks=(1, 32, 128, 128), dtype="int16")
    rng = np.random.default_rng(0)
    for z in range(0, depth, 32):
        slab = rng.normal(0, 200, (1, min(32, depth - z), 512, 512)).astype(np.int16)
        ct[:, z : z + slab.shape[1]] = slab
    from spadkit.normalise import NormalisedArray

    image = NormalisedArray(ct, [(-1000.0, 1000.0)])
    model = PointwiseSegmenter() if model_name == "conv" else create_model(model_name).eval()
    out = {
        "probs": root.create_array("probs", shape=(2, *shape), chunks=(2, 32, 128, 128), dtype="float32"),
        "labels": root.create_array("labels", shape=shape, chunks=(32, 128, 128), dtype="uint8"),
        "uncertainty": root.create_array("uncertainty", shape=shape, chunks=(32, 128, 128), dtype="float32"),
    }
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    prediction = predict(model, image, (1.0, 0.7, 0.7), out=out)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "shape_zyx": list(shape),
        "model": model_name,
        "windows": prediction.windows,
        "seconds": seconds,
        "rss_before_mb": before,
        "peak_rss_above_before_mb": peak - before,
        "volume_float32_mb": float(np.prod(shape)) * 4 / 2**20,
        "probabilities_float32_mb": float(np.prod(shape)) * 8 / 2**20,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    engines = ["monai", "spadkit", "spadkit_zarr"]
    seconds = [[r["seconds"] for r in result["speed"] if r["engine"] == e] for e in engines]
    left.boxplot(seconds, tick_labels=engines)
    left.set_ylabel("seconds per MNI152 volume")
    left.set_title(f"sliding-window inference ({result['settings']['model']})\nmonai / spadkit = {result['speed_ratio_monai_over_spadkit']:.2f}")
    memory = result["memory"]
    right.bar(["peak RSS\nabove start", "CT volume\nfloat32", "probabilities\nfloat32"], [memory["peak_rss_above_before_mb"], memory["volume_float32_mb"], memory["probabilities_float32_mb"]], color=["tab:green", "tab:gray", "tab:gray"])
    right.set_ylabel("MB")
    right.set_title(f"lazy Zarr prediction of a {'x'.join(map(str, memory['shape_zyx'][::-1]))} CT")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/inference.json")
    parser.add_argument("--model", default="spad_unetr_test", help="network of the speed comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ct-depth", type=int, default=600)
    parser.add_argument("--ct-model", default="conv", help="network of the memory run: conv (1x1x1) or a registered segmenter")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(memory_child(args.ct_depth, args.ct_model, args.threads)))
        return
    print(f"speed: {args.model} on the MNI152 T1", flush=True)
    runs, speed_settings = speed(args.model, args.repeats, args.threads)
    median = {e: statistics.median(r["seconds"] for r in runs if r["engine"] == e) for e in ("monai", "spadkit", "spadkit_zarr")}
    print(f"memory: {args.ct_depth}x512x512 CT from Zarr ({args.ct_model})", flush=True)
    child = subprocess.run([sys.executable, __file__, "--child", "--ct-depth", str(args.ct_depth), "--ct-model", args.ct_model, "--threads", str(args.threads)], capture_output=True, text=True, check=True)
    result = {
        "speed": runs,
        "speed_ratio_monai_over_spadkit": median["monai"] / median["spadkit"],
        "speed_ratio_monai_over_spadkit_zarr": median["monai"] / median["spadkit_zarr"],
        "memory": json.loads(child.stdout.strip().splitlines()[-1]),
        "settings": {
            "model": args.model,
            "threads": args.threads,
            "repeats": args.repeats,
            **speed_settings,
            "cpu": cpu_model(),
            "torch": torch.__version__,
            "monai": package_version("monai"),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    memory = result["memory"]
    print(f"monai/spadkit {result['speed_ratio_monai_over_spadkit']:.2f}, monai/spadkit_zarr {result['speed_ratio_monai_over_spadkit_zarr']:.2f}; max |p difference| {speed_settings['max_abs_prob_difference']:.1e}")
    print(f"CT peak RSS +{memory['peak_rss_above_before_mb']:.0f} MB vs volume float32 {memory['volume_float32_mb']:.0f} MB ({memory['seconds']:.0f} s)")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
