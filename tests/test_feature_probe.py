"""The frozen-feature probe (spadkit.probe, benchmarks/feature_probe.py) measures what it claims."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spadkit.models import create_model
from spadkit.probe import (
    ProbeSettings,
    ProbeVolume,
    TokenMap,
    backbone_features,
    best_dice,
    dense_tokens,
    features_at_points,
    heldout_copy,
    hemisphere,
    histogram_features,
    mni152_probe_volume,
    run_probe,
    target_features,
    ventricle_mask,
)

pytest.importorskip("nilearn")
pytest.importorskip("sklearn")


def _ramp_volume() -> ProbeVolume:
    z, y, x = np.meshgrid(np.arange(70), np.arange(60), np.arange(50), indexing="ij")
    return ProbeVolume(((z + 2 * y + 3 * x) / 1000).astype(np.float32), {}, (1.0, 1.0, 1.0), 25)


@pytest.mark.parametrize("shifts", [1, 2, 4])
def test_token_map_cells_land_on_their_voxels(shifts):
    """Token means of a linear ramp, interpolated at voxels, give the ramp back inside the volume (any shift count)."""
    volume = _ramp_volume()
    token_map = dense_tokens(volume, lambda x, spacing: F.avg_pool3d(x, 16)[0], (16, 16, 16), shifts)
    assert token_map.step == (16 // shifts,) * 3
    inner = np.argwhere(np.ones((28, 28, 28), bool)) + 10  # away from the padding
    values = features_at_points(token_map, inner)[:, 0]
    np.testing.assert_allclose(values, volume.image[tuple(inner.T)], atol=1e-5)
    if shifts > 1:  # a wrong offset is caught
        shifted = TokenMap(token_map.features, token_map.step, (0, 0, 0))
        assert np.abs(features_at_points(shifted, inner)[:, 0] - values).max() > 1e-3


def test_point_interpolation_is_torch_trilinear():
    """features_at_points equals F.interpolate(mode="trilinear") everywhere, borders included."""
    generator = torch.Generator().manual_seed(0)
    token_map = TokenMap(torch.randn(3, 4, 5, 6, generator=generator), (8, 4, 2), (4, 2, 0))
    full = F.interpolate(token_map.features[None], scale_factor=token_map.step, mode="trilinear", align_corners=False)[0]
    points = np.argwhere(np.ones((28, 18, 12), bool))
    expected = full[:, points[:, 0] + 4, points[:, 1] + 2, points[:, 2]].T.numpy()
    np.testing.assert_allclose(features_at_points(token_map, points), expected, atol=1e-5)


def test_best_dice_picks_the_best_cut():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    labels = np.array([1, 1, 0, 1, 0], bool)
    threshold, dice = best_dice(scores, labels)
    assert (threshold, dice) == (0.6, pytest.approx(2 * 3 / (4 + 3)))
    assert best_dice(np.array([0.5, 0.5, 0.5]), np.array([1, 0, 0], bool))[1] == pytest.approx(0.5)  # ties cut together


def test_ventricle_mask_is_the_largest_enclosed_cavity():
    tissue = np.ones((20, 20, 20), bool)
    tissue[:, :, :2] = False  # outside, connected to the border: not a cavity
    tissue[4:8, 4:8, 4:8] = False  # 64 voxels
    tissue[12:14, 12:14, 12:14] = False  # 8 voxels
    mask = ventricle_mask(tissue)
    assert mask.sum() == 64 and mask[5, 5, 5]


@pytest.fixture(scope="module")
def mni2() -> ProbeVolume:
    return mni152_probe_volume(downsample=2)


def test_mni_targets(mni2):
    """The ventricles: ~18 ml on both sides of the midline, deep inside the head; GM is far larger."""
    ventricles = mni2.targets["ventricles"]
    ml = ventricles.sum() * np.prod(mni2.spacing) / 1000
    assert 12 < ml < 25
    xs = np.flatnonzero(ventricles.any(axis=(0, 1)))
    assert xs.min() < mni2.midline <= xs.max()
    assert not (ventricles & ~mni2.region).any()  # never outside the head
    assert mni2.targets["gm"].sum() > 20 * ventricles.sum()


def test_probe_is_sane_and_can_fail(mni2):
    """Intensity finds GM but not the ventricles; pure-noise features sit at chance; features that
    hold the answer at token resolution find the ventricles (so the probe can succeed on them)."""
    generator = torch.Generator().manual_seed(0)

    def noise(volume: ProbeVolume) -> TokenMap:  # independent of the image
        grid = [-(-n // 16) + 1 for n in volume.image.shape]
        return TokenMap(torch.randn(16, *grid, generator=generator), (16, 16, 16))

    torch.manual_seed(0)
    arms = {"intensity": None, "histogram": histogram_features(), "noise": noise, "answer": target_features("ventricles", step=8), "random": backbone_features(create_model("spad_vit_test"))}
    volumes = {"transductive": mni2, "heldout": heldout_copy(mni2)}
    runs = run_probe(arms, volumes, ProbeSettings(ks=(16,), seeds=(0,), max_train_voxels=6000, eval_stride=2))
    got = {(r["arm"], r["target"], r["eval"]): r for r in runs}
    assert len(runs) == 5 * 2 * 2
    right = hemisphere(mni2, right=True)
    chance = {target: mni2.targets[target][right].mean() for target in ("gm", "ventricles")}  # AP of a random ranking
    assert got["intensity", "gm", "transductive"]["dice_thr"] > 0.9
    assert got["intensity", "ventricles", "transductive"]["dice_thr"] < 0.4  # needs context
    assert got["histogram", "gm", "transductive"]["ap"] > got["noise", "gm", "transductive"]["ap"] + 0.05
    for evaluation in volumes:
        assert abs(got["noise", "gm", evaluation]["ap"] - chance["gm"]) < 0.04
        assert got["noise", "ventricles", evaluation]["ap"] < 3 * chance["ventricles"]
        assert got["answer", "ventricles", evaluation]["dice_thr"] > 0.35  # 16 mm cells on this 2 mm copy
    assert all(0 <= r["dice_thr"] <= r["dice_oracle"] + 1e-9 <= 1 + 1e-9 and 0 < r["ap"] <= 1 for r in runs)


@pytest.mark.slow
def test_cli_writes_runs_and_plot(tmp_path):
    spec = importlib.util.spec_from_file_location("feature_probe", Path(__file__).parents[1] / "benchmarks" / "feature_probe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "probe.json"
    bench.main(["--out", str(out), "--downsample", "4", "--ks", "1", "--seeds", "0", "--shifts", "1", "--arms", "random", "histogram", "--threads", "1"])
    result = json.loads(out.read_text())
    assert {(r["arm"], r["target"], r["k"], r["seed"]) for r in result["runs"]} == {
        (arm, target, 1, 0) for arm in ("random", "histogram") for target in ("gm", "ventricles")
    }
    assert {"dice_thr", "ap", "eval"} <= set(result["runs"][0]) and result["settings"]["model"] == "spad_vit_test"
    assert out.with_suffix(".png").stat().st_size > 10_000
