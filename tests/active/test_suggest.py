"""rank_slices on synthetic features: uncertainty picks the slices the head cannot decide, diversity spreads picks out,
a cold start (no labels, no head) picks the slices with most tissue; every axis is a candidate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spadkit.active.suggest import STRIDE, rank_slices
from spadkit.models.light_head import LightHead, VoxelFeatures

SHAPE = Z, Y, X = (32, 28, 24)
PATCH = (4, 4, 4)
TOKEN_FEATURES = 6
#: axial slices where the synthetic head is undecided (between two rows of the default ranking grid)
HARD = range(13, 17)


@pytest.fixture
def features() -> VoxelFeatures:
    """Random token features; intensity 0 = a centred ellipsoid "body", intensity 1 = the hard axial band."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(TOKEN_FEATURES, *(math.ceil(n / p) for n, p in zip(SHAPE, PATCH)), generator=generator)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    body = (z / 0.9) ** 2 + (y / 0.8) ** 2 + (x / 0.7) ** 2 < 1
    hard = np.zeros(SHAPE, bool)
    hard[HARD.start : HARD.stop] = True
    intensity = torch.from_numpy(np.stack([body, hard]).astype(np.float16))
    return VoxelFeatures(tokens.half(), intensity, PATCH, (1.0, 1.0, 1.0))


def undecided_head(features: VoxelFeatures, confidence: float = 20.0) -> LightHead:
    """A linear head: certain (logits +-confidence) everywhere except where the hard-band feature is 1 (logits 0)."""
    head = LightHead(features.num_features, 2, hidden=0)
    with torch.no_grad():
        head.net.weight.zero_()
        head.net.weight[:, TOKEN_FEATURES + 1] = torch.tensor([-confidence, confidence])
        head.net.bias.copy_(torch.tensor([confidence, -confidence]))
    return head.eval()


def test_the_most_uncertain_slice_comes_first(features):
    ranked = rank_slices(features, undecided_head(features), [], top=4)
    assert [(s.axis, s.index in HARD) for s in ranked] == [(0, True)] * 4
    assert ranked[0].score == pytest.approx(1.0, abs=1e-3) and ranked[0].reason.startswith("uncertainty 1.00")


def test_a_slice_between_grid_rows_takes_the_uncertainty_of_the_nearest_row(features):
    """Slices 13..16 lie nearest to grid rows 14 and 18; only row 14 is in the band, so 17 and 18 are certain."""
    assert STRIDE == 4
    scores = {s.index: s.score for s in rank_slices(features, undecided_head(features), [], top=200) if s.axis == 0}
    assert min(scores[z] for z in (13, 14, 15)) > 0.9 > 0.1 > max(scores[z] for z in (17, 18, 19))


def test_cold_start_without_labels_ranks_every_axis_by_tissue(features):
    ranked = rank_slices(features, None, [], top=200)
    assert {s.axis for s in ranked} == {0, 1, 2}
    best = ranked[0]
    assert best.reason.startswith("cold start") and "tissue" in best.reason
    assert abs(best.index - SHAPE[best.axis] / 2) <= 2  # the central slice of the ellipsoid has most tissue
    edges = [s.score for s in ranked if s.index in (0, SHAPE[s.axis] - 1)]
    assert max(edges, default=0.0) < 0.5 * best.score


def test_corrected_slices_are_never_suggested_and_push_their_neighbours_down(features):
    before = {(s.axis, s.index): s.score for s in rank_slices(features, None, [], top=200)}
    first = max(before, key=before.get)
    ranked = rank_slices(features, None, [{"axis": first[0], "index": first[1], "split": "train"}], top=200)
    after = {(s.axis, s.index): s.score for s in ranked}
    assert first not in after
    for gap in (-1, 1):
        neighbour = (first[0], first[1] + gap)
        assert after[neighbour] < 0.5 * before[neighbour]
    assert "diversity" in ranked[0].reason and "from 1 corrected" in ranked[0].reason


def test_scores_are_sorted_and_bounded(features):
    ranked = rank_slices(features, undecided_head(features), [{"axis": 0, "index": 14, "split": "train"}], top=50)
    scores = [s.score for s in ranked]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
