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

Losses (:func:`tokenizer_losses`, PUMIT's ``VQGANLoss``): L1 reconstruction on
intensities scaled to [-1, 1], ``-H(mean p)`` (codebook usage over the global
batch: minimising it spreads tokens over codes) and ``mean H(p)`` (per-token
entropy: minimising it makes assignments confident), an optional perceptual
term on 2D slices (PUMIT uses LPIPS with VGG weights, which cannot be
downloaded here: pass any module), plus the hinge GAN term with
:class:`PatchDiscriminator` (PUMIT's ``SimplePatchDiscriminator``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spadkit.models.spad import SpadConv3d, SpadConvTranspose3d
from spadkit.models.vit import resolve_level

Level = int | torch.Tensor | None


def _norm(channels: int, groups: int = 8) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class _ConvUnit(nn.Module):
    """SpadConv3d -> GroupNorm -> activation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, level: int, act: Callable[[], nn.Module], groups: int = 8):
        super().__init__()
        self.conv = SpadConv3d(cin, cout, kernel, stride, level=level)
        self.norm = _norm(cout, groups)
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

    def encode(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float], level: Level = None) -> torch.Tensor:
        """Code logits ``(B, K, gz, gy, gx)`` of images ``(B, C, Z, Y, X)`` (intensities in [0, 1]).

        ``level``: the batch's anisotropy level (:func:`~spadkit.models.vit.resolve_level`).
        """
        return self._quantised(x, resolve_level(level, spacing, x.shape[2]))[1]

    def forward(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float], level: Level = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction ``(B, C, Z, Y, X)`` in [0, 1] scale and code logits ``(B, K, gz, gy, gx)``."""
        level = resolve_level(level, spacing, x.shape[2])
        h, logits = self._quantised(x, level)
        for unit in self.decoder_convs:
            h = unit(h, level)
        for up, unit in zip(self.up, self.up_convs):
            h = unit(up(h, level), level)
        return (self.out(h, level) + 1) / 2, logits


class PatchDiscriminator(nn.Module):
    """Spacing-adaptive patch discriminator: PUMIT's ``SimplePatchDiscriminator``.

    ``len(channels)`` stride-2 3x3x3 stages, ``num_post_convs`` stride-1 3x3x3 stages
    (each GroupNorm(16) and LeakyReLU(0.01)), then a 3x3x3 conv to one logit per location.
    PUMIT's size is ``channels=(128, 256, 512)`` with one post conv (~8.7 M parameters).

    Args:
        in_chans: image channels.
        channels: output channels of the stride-2 stages.
        num_post_convs: stride-1 stages after them.
    """

    def __init__(self, in_chans: int = 1, channels: Sequence[int] = (128, 256, 512), num_post_convs: int = 1):
        super().__init__()
        units, cin = [], in_chans
        for level, cout in enumerate(channels):
            units.append(_ConvUnit(cin, cout, 3, 2, level, nn.LeakyReLU, groups=16))
            cin = cout
        units += [_ConvUnit(cin, cin, 3, 1, len(channels), nn.LeakyReLU, groups=16) for _ in range(num_post_convs)]
        self.units = nn.ModuleList(units)
        self.head = SpadConv3d(cin, 1, 3, 1, level=len(channels))

    def forward(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float], level: Level = None) -> torch.Tensor:
        """Logits ``(B, 1, z, y, x)`` (stride 8 in-plane) for images ``(B, C, Z, Y, X)`` in [0, 1]."""
        level = resolve_level(level, spacing, x.shape[2])
        h = 2 * x - 1
        for unit in self.units:
            h = unit(h, level)
        return self.head(h, level)


Gather = Callable[[torch.Tensor], torch.Tensor]


def code_entropies(logits: torch.Tensor, gather: Gather | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H(mean p), mean H(p))`` in nats for code logits ``(B, K, ...)``.

    ``gather`` (e.g. ``LightningModule.all_gather``) maps this rank's ``(K,)`` mean code
    probabilities to every rank's, ``(W, K)`` (or ``(K,)`` on one process): the usage
    entropy is then over the global batch, with gradients through this rank's share
    only (PUMIT's quantiser; ``all_reduce`` would not keep the local gradient).
    """
    logp = logits.movedim(1, -1).reshape(-1, logits.shape[1]).log_softmax(-1)
    p = logp.exp()
    per_token = -(p * logp).sum(-1).mean()
    mean_p = p.mean(0)
    if gather is not None:
        local = mean_p.detach()
        mean_p = gather(local).reshape(-1, len(local)).mean(0) - local + mean_p
    usage = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
    return usage, per_token


def sample_slices(x: torch.Tensor, recon: torch.Tensor, max_slices: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """2D slices ``(B * S, C, Y, X)`` of ``x`` and ``recon`` ``(B, C, Z, Y, X)`` for a 2D perceptual
    loss: every slice, or ``max_slices`` random slices per sample where ``Z`` is larger (PUMIT)."""
    b, c, z = x.shape[:3]
    if z > max_slices:
        index = torch.ones(b, z).multinomial(max_slices, generator=generator).to(x.device)
        index = index[:, None, :, None, None].expand(b, c, max_slices, *x.shape[3:])
        x, recon = x.gather(2, index), recon.gather(2, index)
    return tuple(t.transpose(1, 2).reshape(-1, c, *t.shape[3:]) for t in (x, recon))


def tokenizer_losses(
    x: torch.Tensor,
    recon: torch.Tensor,
    logits: torch.Tensor,
    *,
    usage_weight: float = 1.0,
    entropy_weight: float = 0.2,
    perceptual: nn.Module | None = None,
    perceptual_weight: float = 1.0,
    max_perceptual_slices: int = 24,
    gather: Gather | None = None,
) -> dict[str, torch.Tensor]:
    """Generator-side losses; ``loss`` is their weighted sum (PUMIT's ``VQGANLoss.forward_gen``).

    ``x``, ``recon``: ``(B, C, Z, Y, X)`` in [0, 1]; both are compared on [-1, 1] as in
    PUMIT, so ``l1`` is twice the [0, 1] error and the usage/entropy weights keep PUMIT's
    balance against it. ``perceptual(input, target)`` gets 2D slices ``(N, C, Y, X)`` on
    [-1, 1] (:func:`sample_slices`). ``gather``: see :func:`code_entropies`.

    The default weights are PUMIT's config defaults, which keep every code in use
    when training from scratch. PUMIT's published run used ``usage_weight=0.03,
    entropy_weight=1.0`` as a later, sharpening stage; from scratch those collapse
    the codebook to a couple of codes within a few hundred steps (seen on the demo).
    """
    usage, per_token = code_entropies(logits, gather)
    signed_x, signed_recon = 2 * x - 1, 2 * recon - 1
    losses = {"l1": F.l1_loss(signed_recon, signed_x), "code_usage": usage, "token_entropy": per_token}
    loss = losses["l1"] - usage_weight * usage + entropy_weight * per_token
    if perceptual is not None:
        target, prediction = sample_slices(signed_x, signed_recon, max_perceptual_slices)
        losses["perceptual"] = perceptual(prediction, target).mean()
        loss = loss + perceptual_weight * losses["perceptual"]
    losses["loss"] = loss
    return losses


def hinge_losses(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``0.5 * (relu(1 - D(x)) + relu(1 + D(x_rec)))``."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())
