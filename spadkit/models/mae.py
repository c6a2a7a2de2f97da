"""Masked autoencoding (MAE, He et al. 2022; VISION-MAE, arXiv 2402.01034) for SPAD-ViT.

The encoder (:meth:`~spadkit.models.vit.SpadViT.forward_visible`) sees only the visible
tokens (25 % by default); :class:`MAEDecoder`, a light transformer, puts a learnable mask
token at every dropped position, adds its own position embedding and rotary angles, and
reconstructs every token's voxels through the spacing-adaptive transposed patchify of
:class:`~spadkit.models.heads.PixelHead`: 16x16x16 voxels per token at 1 mm, 4x16x16 at
0.7x0.7x5 mm, 1x16x16 in 2D, with one set of weights. The loss (see
:func:`mae_loss`) is MAE's: mean squared error on per-patch normalised voxels of the
*masked* tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spadkit.models.heads import PixelHead
from spadkit.models.vit import Block, resample_grid, rope_tables, token_patches


def random_keep(batch_size: int, num_tokens: int, mask_ratio: float, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B, V)`` sorted indices of the visible tokens: ``V = N - round(N * mask_ratio)``, at least 1,
    and at least one token masked when ``N > 1``."""
    masked = min(max(round(num_tokens * mask_ratio), 1 if num_tokens > 1 else 0), num_tokens - 1)
    order = torch.rand(batch_size, num_tokens, generator=generator).argsort(dim=1)
    return order[:, : num_tokens - masked].sort(dim=1).values.to(device)


def masked_positions(keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``(B, N)`` bool, True where a token was dropped (not in ``keep``)."""
    mask = torch.ones(len(keep), num_tokens, dtype=torch.bool, device=keep.device)
    return mask.scatter(1, keep, False)


class MAEDecoder(nn.Module):
    """Light transformer decoder from visible-token features to the voxels of every token.

    Args:
        encoder_dim: width of the encoder's tokens.
        out_chans: image channels to reconstruct.
        dim, depth, num_heads: decoder size (MAE's default for ViT-B: 512, 8, 16; far smaller
            suffices for small crops, as in VISION-MAE's lightweight decoder).
        pos_grid: the learnable position-embedding grid, resampled to each batch's token grid.

    Shapes: ``forward(encoded (B, 1 + V, E), keep (B, V), grid, level) -> (B, out_chans, Z, Y, X)``.
    """

    def __init__(self, encoder_dim: int, out_chans: int = 1, dim: int = 128, depth: int = 2, num_heads: int = 4, pos_grid: tuple[int, int, int] = (8, 8, 8)):
        super().__init__()
        self.num_heads = num_heads
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *pos_grid))
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pixels = PixelHead(dim, out_chans)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, encoded: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int, int], level: int) -> torch.Tensor:
        x = self.embed(encoded)
        batch, dim = x.shape[0], x.shape[-1]
        tokens = self.mask_token.expand(batch, grid[0] * grid[1] * grid[2], dim).to(x.dtype)
        tokens = tokens.scatter(1, keep[..., None].expand(-1, -1, dim), x[:, 1:])
        tokens = tokens + resample_grid(self.pos_embed, grid).flatten(2).transpose(1, 2)
        tokens = torch.cat([x[:, :1], tokens], dim=1)
        rope = rope_tables(grid, dim // self.num_heads, str(tokens.device))
        for block in self.blocks:
            tokens = block(tokens, rope, 1)
        return self.pixels(self.norm(tokens)[:, 1:], grid, level)


def mae_loss(recon: torch.Tensor, image: torch.Tensor, grid: tuple[int, int, int], masked: torch.Tensor) -> torch.Tensor:
    """MSE between ``recon`` and per-patch normalised voxels of ``image`` (MAE's ``norm_pix_loss``) on
    the ``masked`` ``(B, N)`` tokens; both images ``(B, C, Z, Y, X)``."""
    pred, target = token_patches(recon, grid), token_patches(image, grid)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    return F.mse_loss(pred[masked], target[masked])
