"""SPAD-VT: the visual tokenizer whose codes are the masked-image-modelling targets.

An autoencoder with the same spacing-adaptive down-sampling as SPAD-ViT (total
stride 16 in-plane; depth as the spacing rule says), so its token grid equals
the ViT's for every input. Between encoder and decoder sits a *soft* vector
quantiser (PUMIT): each token's code distribution ``p = softmax(W z)`` over
``num_codes`` codes, and the decoder sees ``p @ codebook``. MIM then predicts
``p`` for masked tokens.

Layout (channels ``c0, c1, c2``; all convolutions spacing-adaptive)::

    encoder  patchify 4 -> c0, GN, GELU | patchify 2 -> c1 | patchify 2 -> c2 | 2 x (3x3x3, GN, LeakyReLU)
    quantise logits = Linear(c2 -> K); p = softmax; z_q = p @ codebook (K x c2)
    decoder  2 x (3x3x3) | up 2 -> c1, 3x3x3 | up 2 -> c0, 3x3x3 | up 4 -> in_chans

Losses (:func:`tokenizer_losses`): L1 reconstruction, ``-H(mean p)`` (codebook
usage: minimising it spreads tokens over codes) and ``mean H(p)`` (per-token
entropy: minimising it makes assignments confident), plus an optional hinge
GAN term with :class:`PatchDiscriminator`. A perceptual (LPIPS) term needs VGG
weights, which cannot be downloaded here: pass any ``perceptual`` module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spadkit.models.spad import SpadConv3d, SpadConvTranspose3d, batch_level


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class _ConvUnit(nn.Module):
    """SpadConv3d -> GroupNorm -> activation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, level: int, act: type[nn.Module]):
        super().__init__()
        self.conv = SpadConv3d(cin, cout, kernel, stride, level=level)
        self.norm = _norm(cout)
        self.act = act()

    def forward(self, x: torch.Tensor, aniso_level: int) -> torch.Tensor:
        return self.act(self.norm(self.conv(x, aniso_level)))


class SoftQuantizer(nn.Module):
    """Soft vector quantiser: code probabilities per token and their expected code vector."""

    def __init__(self, dim: int, num_codes: int):
        super().__init__()
        self.proj = nn.Linear(dim, num_codes)
        self.codebook = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` ``(B, C, gz, gy, gx)`` -> ``(z_q`` same shape, ``logits`` ``(B, K, gz, gy, gx))``."""
        logits = self.proj(z.movedim(1, -1))
        z_q = logits.softmax(-1) @ self.codebook
        return z_q.movedim(-1, 1), logits.movedim(-1, 1)


class SpadVT(nn.Module):
    """Spacing-adaptive visual tokenizer (see the module docstring).

    Args:
        in_chans: image channels.
        channels: ``(c0, c1, c2)`` of the three down-sampling stages.
        num_codes: codebook size ``K`` (PUMIT: 1024 codes of dimension 512 = ``c2``).
    """

    stride = 16

    def __init__(self, in_chans: int = 1, channels: Sequence[int] = (128, 256, 512), num_codes: int = 1024):
        super().__init__()
        c0, c1, c2 = channels
        self.in_chans, self.num_codes = in_chans, num_codes
        self.encoder = nn.ModuleList(
            [
                _ConvUnit(in_chans, c0, 4, 4, 0, nn.GELU),
                _ConvUnit(c0, c1, 2, 2, 2, nn.GELU),
                _ConvUnit(c1, c2, 2, 2, 3, nn.GELU),
                _ConvUnit(c2, c2, 3, 1, 4, nn.LeakyReLU),
                _ConvUnit(c2, c2, 3, 1, 4, nn.LeakyReLU),
            ]
        )
        self.quantizer = SoftQuantizer(c2, num_codes)
        self.decoder_convs = nn.ModuleList([_ConvUnit(c2, c2, 3, 1, 4, nn.LeakyReLU), _ConvUnit(c2, c2, 3, 1, 4, nn.LeakyReLU)])
        self.up = nn.ModuleList([SpadConvTranspose3d(c2, c1, 2, level=4), SpadConvTranspose3d(c1, c0, 2, level=3)])
        self.up_convs = nn.ModuleList([_ConvUnit(c1, c1, 3, 1, 3, nn.LeakyReLU), _ConvUnit(c0, c0, 3, 1, 2, nn.LeakyReLU)])
        self.out = SpadConvTranspose3d(c0, in_chans, 4, level=2)

    def _quantised(self, x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = 2 * x - 1
        for unit in self.encoder:
            h = unit(h, level)
        return self.quantizer(h)

    def encode(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Code logits ``(B, K, gz, gy, gx)`` of images ``(B, C, Z, Y, X)`` (intensities in [0, 1])."""
        return self._quantised(x, batch_level(spacing, x.shape[2]))[1]

    def forward(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction ``(B, C, Z, Y, X)`` in [0, 1] scale and code logits ``(B, K, gz, gy, gx)``."""
        level = batch_level(spacing, x.shape[2])
        h, logits = self._quantised(x, level)
        for unit in self.decoder_convs:
            h = unit(h, level)
        for up, unit in zip(self.up, self.up_convs):
            h = unit(up(h, level), level)
        return (self.out(h, level) + 1) / 2, logits


class PatchDiscriminator(nn.Module):
    """Spacing-adaptive patch discriminator (three stride-2 stages, then a 1-channel logit map)."""

    def __init__(self, in_chans: int = 1, channels: Sequence[int] = (64, 128, 256)):
        super().__init__()
        units, cin = [], in_chans
        for level, cout in enumerate(channels):
            units.append(_ConvUnit(cin, cout, 3, 2, level, lambda: nn.LeakyReLU(0.2)))
            cin = cout
        self.units = nn.ModuleList(units)
        self.head = SpadConv3d(cin, 1, 3, 1, level=len(channels))

    def forward(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float]) -> torch.Tensor:
        level = batch_level(spacing, x.shape[2])
        h = 2 * x - 1
        for unit in self.units:
            h = unit(h, level)
        return self.head(h, level)


def code_entropies(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H(mean p), mean H(p))`` in nats for code logits ``(B, K, ...)``."""
    logp = logits.movedim(1, -1).reshape(-1, logits.shape[1]).log_softmax(-1)
    p = logp.exp()
    per_token = -(p * logp).sum(-1).mean()
    mean_p = p.mean(0)
    usage = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
    return usage, per_token


def tokenizer_losses(
    x: torch.Tensor,
    recon: torch.Tensor,
    logits: torch.Tensor,
    *,
    usage_weight: float = 1.0,
    entropy_weight: float = 0.2,
    perceptual: nn.Module | None = None,
    perceptual_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Generator-side losses; ``loss`` is their weighted sum.

    The default weights are PUMIT's config defaults, which keep every code in use
    when training from scratch. PUMIT's published run used ``usage_weight=0.03,
    entropy_weight=1.0`` as a later, sharpening stage; from scratch those collapse
    the codebook to a couple of codes within a few hundred steps (seen on the demo).
    """
    usage, per_token = code_entropies(logits)
    losses = {"l1": F.l1_loss(recon, x), "code_usage": usage, "token_entropy": per_token}
    loss = losses["l1"] - usage_weight * usage + entropy_weight * per_token
    if perceptual is not None:
        losses["perceptual"] = perceptual(recon, x).mean()
        loss = loss + perceptual_weight * losses["perceptual"]
    losses["loss"] = loss
    return losses


def hinge_losses(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``0.5 * (relu(1 - D(x)) + relu(1 + D(x_rec)))``."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())
