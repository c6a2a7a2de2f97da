"""The diagnostic math: each baseline tells a content signal from a position-only or empty one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spadkit.tasks.diagnostics import (
    PositionPrior,
    TokenizerProbe,
    codes_used,
    conditional_mutual_information,
    content_labels,
    excess_mutual_information,
    patch_mean_baseline,
    patch_mean_psnr,
    textured_tokens,
)

RNG = np.random.default_rng(0)
POSITION = np.tile(np.arange(8), 400)  # 400 crops of 8 tokens
CONTENT = RNG.integers(0, 4, POSITION.shape)


def test_position_only_code_carries_no_content_information():
    code = POSITION % 4  # the 2x2x2-crop failure: the code says where the token is
    assert conditional_mutual_information(code, CONTENT, POSITION) == pytest.approx(0.0, abs=1e-12)
    assert excess_mutual_information(code, CONTENT, POSITION) == pytest.approx(0.0, abs=1e-12)


def test_content_code_carries_its_entropy_and_noise_carries_nothing():
    assert conditional_mutual_information(CONTENT, CONTENT, POSITION) == pytest.approx(math.log(4), abs=0.02)
    assert excess_mutual_information(CONTENT, CONTENT, POSITION) > 1.2
    half = CONTENT // 2  # a coarser content code: one bit of two
    assert excess_mutual_information(half, CONTENT, POSITION) == pytest.approx(math.log(2), abs=0.05)
    noise = RNG.integers(0, 4, POSITION.shape)  # independent of content: the plug-in estimate alone is biased upwards
    assert conditional_mutual_information(noise, CONTENT, POSITION) > 0.005
    assert abs(excess_mutual_information(noise, CONTENT, POSITION)) < 0.005


def test_mutual_information_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one label per token"):
        conditional_mutual_information(CONTENT[:-1], CONTENT, POSITION)


def test_patch_mean_baseline_and_psnr():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 4, 32, 32)
    grid = (1, 2, 2)
    baseline = patch_mean_baseline(x, grid)
    torch.testing.assert_close(baseline[0, 0, :, :16, :16], x[0, 0, :, :16, :16].mean().expand(4, 16, 16))
    ours, base = patch_mean_psnr(x, baseline, grid)
    assert ours == pytest.approx(base)
    assert base == pytest.approx(10 * math.log10(1 / (1 / 12)), abs=0.3)  # uniform noise around its mean: var 1/12
    assert patch_mean_psnr(x, x + 0.01, grid)[0] == pytest.approx(40.0, abs=1e-3)


def test_content_labels_textured_tokens_and_codes_used():
    x = torch.zeros(1, 1, 16, 32, 32)
    x[..., 16:] = 0.9  # right half bright
    x[..., :16, :16] += torch.linspace(0, 0.3, 16)  # top-left token has a gradient
    grid = (1, 2, 2)
    assert content_labels(x, grid).tolist() == [[1, 7, 0, 7]]  # mean 0.15 of the gradient: bin 1 of 8
    assert textured_tokens(x, grid).tolist() == [[True, False, False, False]]
    logits = torch.zeros(2, 16, 1, 2, 2)
    logits[0, 3], logits[1, 5] = 1.0, 1.0
    assert codes_used(logits) == 2 / 16


def test_tokenizer_probe_reports_content_codes_and_psnrs():
    torch.manual_seed(0)
    probe = TokenizerProbe(window=50)
    for _ in range(40):
        x = torch.rand(2, 1, 16, 32, 32) * torch.rand(2, 1, 1, 1, 1)  # crops of random brightness
        grid = (1, 2, 2)
        content = content_labels(x, grid)
        logits = torch.nn.functional.one_hot(content, 8).float().transpose(1, 2).reshape(2, 8, *grid) * 10
        stats = probe.add(x, patch_mean_baseline(x, grid), logits)
        assert stats["psnr"] == pytest.approx(stats["psnr_patch_mean"])
    summary = probe.summary()
    assert summary["mi_content_given_position"] > 0.5
    assert summary["mi_code_position"] < 0.05


def test_position_prior_is_the_position_only_floor():
    prior = PositionPrior()
    k, n = 4, 6
    position_target = torch.nn.functional.one_hot(torch.arange(n) % k, k).float()[None].expand(2, n, k)
    mask = torch.ones(2, n, dtype=torch.bool)
    assert prior.cross_entropy(position_target, mask, (1, 2, 3)) is None  # nothing seen yet on this grid
    losses = [prior.cross_entropy(position_target, mask, (1, 2, 3)) for _ in range(50)]
    assert losses[-1] < 0.05  # targets that follow position: the floor reaches ~0
    content = PositionPrior()
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        target = torch.nn.functional.one_hot(torch.randint(0, k, (2, n), generator=generator), k).float()
        last = content.cross_entropy(target, mask, (1, 2, 3))
    assert last == pytest.approx(math.log(k), abs=0.15)  # content targets: position says nothing
    frozen = prior.counts[(1, 2, 3)]
    prior.cross_entropy(position_target, mask, (1, 2, 3), update=False)
    assert prior.counts[(1, 2, 3)] == frozen
