"""Is pretraining learning about images? Trivial baselines to log beside every loss.

A falling loss is not evidence of learning (PITFALLS 20): a tokenizer can satisfy its
codebook-usage term by coding token *position*, and MIM on such codes falls to a floor
that a predictor knowing only position reaches. These functions measure against the
baselines that expose that:

* :func:`conditional_mutual_information` of code and content given position (nats),
  with a permutation null so a small sample does not read as information;
* :func:`patch_mean_psnr`: reconstruction PSNR against replacing every token's voxels
  by their mean, which needs no learning;
* :class:`PositionPrior`: the cross-entropy of a predictor that knows only the token's
  position in the crop (the MIM floor besides the target entropy);
* :func:`textured_tokens`: tokens with intensity variation, where predicting zero
  (the MAE target's mean) is the baseline to beat.

All images are ``(B, C, Z, Y, X)`` with intensities in [0, 1]; token grids ``(gz, gy, gx)``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np
import torch

from spadkit.models.vit import token_patches

#: content bins: the token's mean intensity on [0, 1] in this many equal bins
CONTENT_BINS = 8
#: a token is "textured" when its voxels' standard deviation (intensity in [0, 1]) exceeds this
TEXTURE_STD = 0.02


def _entropy(*keys: np.ndarray) -> float:
    """Plug-in entropy (nats) of the joint distribution of integer label arrays of one length."""
    _, counts = np.unique(np.stack(keys, axis=1), axis=0, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def conditional_mutual_information(code: np.ndarray, content: np.ndarray, position: np.ndarray) -> float:
    """Plug-in ``I(code; content | position)`` in nats of integer labels, one per token.

    ``H(C, P) + H(X, P) - H(C, X, P) - H(P)``. Zero when the code is a function of the
    position alone (or constant); at most ``min(H(C|P), H(X|P))``.
    """
    code, content, position = (np.asarray(a, dtype=np.int64).ravel() for a in (code, content, position))
    if not len(code) == len(content) == len(position):
        raise ValueError(f"code, content and position need one label per token, got {len(code)}, {len(content)}, {len(position)}")
    return max(0.0, _entropy(code, position) + _entropy(content, position) - _entropy(code, content, position) - _entropy(position))


def excess_mutual_information(code: np.ndarray, content: np.ndarray, position: np.ndarray, permutations: int = 4, seed: int = 0) -> float:
    """:func:`conditional_mutual_information` minus its mean with content shuffled within
    each position (the plug-in estimate's small-sample bias); ~0 for a code that ignores content."""
    code, content, position = (np.asarray(a, dtype=np.int64).ravel() for a in (code, content, position))
    observed = conditional_mutual_information(code, content, position)
    rng = np.random.default_rng(seed)
    order = np.argsort(position, kind="stable")
    bounds = np.flatnonzero(np.diff(position[order])) + 1
    null = []
    for _ in range(permutations):
        shuffled = content.copy()
        for group in np.split(order, bounds):
            shuffled[group] = content[rng.permutation(group)]
        null.append(conditional_mutual_information(code, shuffled, position))
    return observed - float(np.mean(null))


def content_labels(x: torch.Tensor, grid: Sequence[int], bins: int = CONTENT_BINS) -> torch.Tensor:
    """``(B, N)`` bin of each token's mean intensity (``bins`` equal bins on [0, 1])."""
    means = token_patches(x, grid).mean(-1)
    return (means.clamp(0, 1) * bins).long().clamp_max(bins - 1)


def patch_mean_baseline(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``x`` with every token's voxels (per channel) replaced by their mean: a reconstruction without learning."""
    b, c, z, y, xx = x.shape
    gz, gy, gx = grid
    blocks = x.reshape(b, c, gz, z // gz, gy, y // gy, gx, xx // gx)
    return blocks.mean(dim=(3, 5, 7), keepdim=True).expand_as(blocks).reshape(x.shape)


def psnr(mse: float | torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error on a ``data_range`` scale."""
    mse = float(mse)
    return math.inf if mse <= 0 else 10.0 * math.log10(data_range**2 / mse)


def patch_mean_psnr(x: torch.Tensor, recon: torch.Tensor, grid: Sequence[int]) -> tuple[float, float]:
    """``(PSNR of recon, PSNR of the patch-mean baseline)`` in dB on [0, 1] intensities."""
    return psnr(torch.mean((recon - x) ** 2)), psnr(torch.mean((patch_mean_baseline(x, grid) - x) ** 2))


def textured_tokens(x: torch.Tensor, grid: Sequence[int], std: float = TEXTURE_STD) -> torch.Tensor:
    """``(B, N)`` bool: tokens whose voxels vary (standard deviation above ``std``)."""
    return token_patches(x, grid).std(-1) > std


def codes_used(logits: torch.Tensor) -> float:
    """Share of the ``K`` codes that are some token's most likely code; ``logits`` ``(B, K, ...)``."""
    return len(torch.unique(logits.argmax(1))) / logits.shape[1]


class TokenizerProbe:
    """Collects ``(code, content, position)`` over recent batches and reports the tokenizer diagnostics.

    Args:
        window: batches kept (older ones drop out).
    """

    def __init__(self, window: int = 20):
        self.samples: deque[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]] = deque(maxlen=window)
        self._grids: dict[tuple[int, ...], int] = {}

    @torch.no_grad()
    def add(self, x: torch.Tensor, recon: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
        """Record one batch (``x``, ``recon`` ``(B, C, Z, Y, X)``; ``logits`` ``(B, K, gz, gy, gx)``); its own PSNRs."""
        grid = tuple(logits.shape[2:])
        offset = self._grids.setdefault(grid, len(self._grids)) * 1_000_000  # positions of different grids differ
        n = math.prod(grid)
        code = logits.argmax(1).reshape(len(x), n).cpu().numpy()
        content = content_labels(x, grid).cpu().numpy()
        position = np.broadcast_to(offset + np.arange(n), code.shape)
        mse = float(torch.mean((recon - x) ** 2))
        mse_mean = float(torch.mean((patch_mean_baseline(x, grid) - x) ** 2))
        self.samples.append((code.ravel(), content.ravel(), position.ravel(), mse, mse_mean))
        return {"psnr": psnr(mse), "psnr_patch_mean": psnr(mse_mean), "codes_used": codes_used(logits)}

    def summary(self) -> dict[str, float]:
        """Diagnostics over the window: excess MI of code and content given position, PSNRs, codes used."""
        if not self.samples:
            return {}
        code, content, position = (np.concatenate([s[i] for s in self.samples]) for i in range(3))
        return {
            "mi_content_given_position": excess_mutual_information(code, content, position),
            "mi_code_position": max(0.0, _entropy(code) + _entropy(position) - _entropy(code, position)),
            "psnr": psnr(np.mean([s[3] for s in self.samples])),
            "psnr_patch_mean": psnr(np.mean([s[4] for s in self.samples])),
            "codes_used_window": len(np.unique(code)),
        }


class PositionPrior:
    """Running mean of the MIM targets per token position: the best predictor that knows only position.

    Its cross-entropy on a batch is computed *before* that batch updates it (out of sample).
    """

    def __init__(self) -> None:
        self.sums: dict[tuple[int, ...], torch.Tensor] = {}
        self.counts: dict[tuple[int, ...], int] = {}

    @torch.no_grad()
    def cross_entropy(self, target: torch.Tensor, mask: torch.Tensor, grid: Sequence[int], update: bool = True) -> float | None:
        """Soft cross-entropy (nats) on the masked tokens of ``target`` ``(B, N, K)``, then (``update``)
        add the batch to the running mean; ``None`` on a grid not seen before."""
        grid = tuple(grid)
        loss = None
        if grid in self.sums:
            k = target.shape[-1]
            prior = (self.sums[grid] + 1.0 / k) / (self.counts[grid] + 1)  # one uniform pseudo-sample: no zero probability
            loss = float(-(target * prior.log()).sum(-1)[mask].mean())
        if update:
            self.sums[grid] = self.sums.get(grid, 0) + target.detach().float().sum(0)
            self.counts[grid] = self.counts.get(grid, 0) + len(target)
        return loss


def soft_entropy(target: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each distribution over the last axis of ``target``."""
    return -(target * target.clamp_min(1e-12).log()).sum(-1)
