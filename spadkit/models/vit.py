"""SPAD-ViT: a Vision Transformer whose patch embedding follows the spacing rule.

Structure follows timm's ``VisionTransformer`` (``patch_embed``, ``cls_token``,
``pos_embed``, ``blocks``, ``norm``, ``head``; ``forward_features``,
``forward_head``, ``forward_intermediates``, ``feature_info``) without
depending on timm. Differences that make it spacing-adaptive:

* ``patch_embed`` is a :class:`~spadkit.models.spad.SpadConv3d` of stride 16:
  16x16x16 patches at 1 mm, 4x16x16 at 0.75x0.75x3 mm, 1x16x16 on 2D images;
* the learnable position embedding is a small 3D grid resampled to each
  batch's token grid (area when shrinking, trilinear when growing), plus 3D
  rotary embedding on queries and keys (in-plane pairs split between y and x,
  depth added to all pairs with its own frequencies, as PUMIT's EVA-02 variant);
* attention is ``torch.nn.functional.scaled_dot_product_attention`` (flash
  attention on GPU);
* ``mask`` replaces chosen tokens by a learnable mask token (masked image modelling,
  SimMIM-style), and :meth:`SpadViT.forward_visible` encodes only chosen tokens (MAE).

Every forward takes ``spacing`` ``(B, 3)`` or ``(3,)`` in mm ``(Z, Y, X)``; a
batch must share one anisotropy level.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spadkit.errors import InvalidImageError
from spadkit.models.spad import SpadConv3d, batch_level, depth_halvings

PATCH = 16
PATCH_HALVINGS = 4


def patch_shape(level: int) -> tuple[int, int, int]:
    """Voxels per token ``(dz, 16, 16)`` of the stride-16 SPAD patch embedding at anisotropy ``level``."""
    return (2 ** depth_halvings(0, PATCH_HALVINGS, level), PATCH, PATCH)


def token_grid(spatial_shape: Sequence[int], level: int) -> tuple[int, int, int]:
    """Token grid ``(gz, gy, gx)`` of an input ``(Z, Y, X)`` at anisotropy ``level``."""
    return tuple(n // p for n, p in zip(spatial_shape, patch_shape(level)))


def token_patches(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Voxels of each token: ``(B, C, Z, Y, X)`` -> ``(B, N, C * dz * dy * dx)`` in token order
    (the ``(gz, gy, gx)`` C order of :meth:`SpadViT.forward_features`)."""
    b, c, z, y, xx = x.shape
    gz, gy, gx = grid
    x = x.reshape(b, c, gz, z // gz, gy, y // gy, gx, xx // gx)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, gz * gy * gx, -1)


def resolve_level(level: int | torch.Tensor | None, spacing: torch.Tensor | Sequence[float], depth: int) -> int:
    """The batch's anisotropy level: ``level`` as given (an int, or the batch's ``(B,)`` ``level``
    tensor), else computed from ``spacing`` with :func:`~spadkit.models.spad.batch_level`.

    Pass the level as an int to avoid a device-to-host copy per forward: the pretraining
    tasks read ``batch["level"]`` on the host before the batch moves to the GPU.
    """
    if level is None:
        return batch_level(spacing, depth)
    if isinstance(level, torch.Tensor):
        values = level.reshape(-1).tolist()
        if len(set(values)) != 1:
            raise ValueError(f"a batch must share one anisotropy level, got levels {sorted(set(values))}")
        return int(values[0])
    return int(level)


@functools.lru_cache(maxsize=64)
def rope_tables(grid: tuple[int, int, int], head_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` of shape ``(N, head_dim // 2)`` for a token grid ``(gz, gy, gx)``.

    The ``head_dim // 2`` rotation pairs are split in half between y and x
    (frequencies ``10000 ** (-2j / pairs)``); depth adds its angle to every pair
    (frequencies ``2333 ** (-(2j + 1) / pairs)``), so a one-slice grid reduces to
    2D rotary embedding.
    """
    pairs = head_dim // 2
    quarter = pairs // 2
    j = torch.arange(quarter, dtype=torch.float64)
    inplane = 10000.0 ** (-2 * j / pairs)
    depth = (2333.0 ** (-(2 * j + 1) / pairs)).repeat(2)
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij")
    angles = torch.cat([y.reshape(-1, 1) * inplane, x.reshape(-1, 1) * inplane], dim=1) + z.reshape(-1, 1) * depth
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` ``(B, H, N, D)`` by the angles of ``cos``/``sin`` ``(N, D/2)``."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep q/k in the model's dtype (bf16-true, .half())
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 4:
            raise ValueError(f"dim {dim} must split into {num_heads} heads of a size divisible by 4 (3D rotary embedding)")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, prefix: int) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:  # the prefix (cls) tokens are not rotated
            q = torch.cat([q[:, :, :prefix], apply_rope(q[:, :, prefix:], *rope)], dim=2)
            k = torch.cat([k[:, :, :prefix], apply_rope(k[:, :, prefix:], *rope)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: attention and a GELU MLP, each with a residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, prefix: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, prefix)
        return x + self.mlp(self.norm2(x))


def resample_grid(embed: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Resample a ``(1, C, gz, gy, gx)`` embedding grid to ``grid``: area where it shrinks, trilinear where it grows."""
    grid = tuple(int(g) for g in grid)
    if tuple(embed.shape[2:]) == grid:
        return embed
    smaller = tuple(min(a, b) for a, b in zip(embed.shape[2:], grid))
    if smaller != tuple(embed.shape[2:]):
        embed = F.adaptive_avg_pool3d(embed, smaller)
    if smaller != grid:
        embed = F.interpolate(embed, size=grid, mode="trilinear", align_corners=False)
    return embed


class SpadViT(nn.Module):
    """Spacing-adaptive Vision Transformer (see the module docstring).

    Args:
        in_chans: input channels.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        pos_grid: shape ``(gz, gy, gx)`` of the learnable position-embedding grid.
        rope: add 3D rotary embedding in every block.
        num_classes: size of the classification head on the cls token (0: none).
    """

    def __init__(
        self,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pos_grid: Sequence[int] = (8, 8, 8),
        rope: bool = True,
        num_classes: int = 0,
    ):
        super().__init__()
        self.in_chans, self.embed_dim, self.num_features = in_chans, embed_dim, embed_dim
        self.num_prefix_tokens = 1
        self.patch_embed = SpadConv3d(in_chans, embed_dim, PATCH, PATCH, level=0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *pos_grid))
        self.rope = rope
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.feature_info = [{"num_chs": embed_dim, "reduction": PATCH, "module": f"blocks.{i}"} for i in range(depth)]
        self._init_weights()

    def _init_weights(self) -> None:
        for param in (self.cls_token, self.mask_token, self.pos_embed):
            nn.init.trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (timm's convention)."""
        return {"cls_token", "mask_token", "pos_embed"}

    # ------------------------------------------------------------------ embedding
    def embed(
        self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float], mask: torch.Tensor | None = None, level: int | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Patch tokens with cls token and position embedding.

        Args:
            x: ``(B, C, Z, Y, X)``; each axis a multiple of the patch (see :func:`token_grid`).
            spacing: ``(B, 3)`` or ``(3,)`` mm.
            mask: optional ``(B, N)`` bool; ``True`` tokens become the mask token.
            level: the batch's anisotropy level (see :func:`resolve_level`); computed from
                ``spacing`` when ``None``.

        Raises:
            InvalidImageError: ``x`` does not have ``in_chans`` channels.
            ValueError: an axis is not a multiple of the patch.

        Returns:
            ``(B, 1 + N, C)`` tokens and the token grid ``(gz, gy, gx)``.
        """
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise InvalidImageError(
                f"input {tuple(x.shape)} must be (B, C, Z, Y, X) with C = {self.in_chans} channels (the model's in_chans)",
                fix=f"stream images with {self.in_chans} channel(s), or create the model with in_chans={x.shape[1] if x.ndim == 5 else 'C'} (pretrained weights fix in_chans).",
            )
        level = resolve_level(level, spacing, x.shape[2])
        patch = patch_shape(level)
        if any(n % p for n, p in zip(x.shape[2:], patch)):
            raise ValueError(
                f"input {tuple(x.shape)} must be (B, C, Z, Y, X) with Z, Y, X multiples of the patch {patch} "
                f"for spacing level {level}. Fix: stream patches with PatchSize(..., multiple=spadkit.models.total_stride)."
            )
        tokens = self.patch_embed(x, level)
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2)
        if mask is not None:
            tokens = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + resample_grid(self.pos_embed, grid).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1), grid

    def _rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        return rope_tables(grid, self.embed_dim // self.blocks[0].attn.num_heads, str(device)) if self.rope else None

    # ------------------------------------------------------------------ forwards
    def forward_features(
        self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float], mask: torch.Tensor | None = None, level: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, 1 + N, C)`` normalised tokens (cls first; patch tokens in ``(gz, gy, gx)`` C order)."""
        tokens, grid = self.embed(x, spacing, mask, level)
        rope = self._rope(grid, tokens.device)
        for block in self.blocks:
            tokens = block(tokens, rope, self.num_prefix_tokens)
        return self.norm(tokens)

    def forward_visible(
        self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float], keep: torch.Tensor, level: int | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Encode only the tokens ``keep`` ``(B, V)`` (indices into the ``N`` patch tokens, MAE's encoder).

        Every token keeps its own position embedding and rotary angles, so the encoder never
        sees where the dropped tokens were. Returns ``(B, 1 + V, C)`` normalised tokens (cls
        first, then ``keep``'s order) and the full token grid.
        """
        tokens, grid = self.embed(x, spacing, level=level)
        prefix, dim = self.num_prefix_tokens, tokens.shape[-1]
        visible = tokens[:, prefix:].gather(1, keep[..., None].expand(-1, -1, dim))
        tokens = torch.cat([tokens[:, :prefix], visible], dim=1)
        rope = self._rope(grid, tokens.device)
        if rope is not None:  # per-sample angles (B, 1, V, D/2), broadcast over the heads
            rope = tuple(table[keep][:, None] for table in rope)
        for block in self.blocks:
            tokens = block(tokens, rope, prefix)
        return self.norm(tokens), grid

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Classification from the cls token of :meth:`forward_features`' output."""
        cls = features[:, 0]
        return cls if pre_logits else self.head(cls)

    def forward(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float], level: int | torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, spacing, level=level))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        spacing: torch.Tensor | Sequence[float],
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        level: int | torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Feature maps of chosen blocks, ``(B, C, gz, gy, gx)`` each.

        Args:
            indices: block indices (negative counts from the end), or an int ``n`` for the
                last ``n`` blocks (default all); one map is returned per index, in that order.
            norm: apply the final norm to each.
            level: the batch's anisotropy level (see :func:`resolve_level`).
        """
        depth = len(self.blocks)
        if indices is None:
            wanted = list(range(depth))
        elif isinstance(indices, int):
            wanted = list(range(depth - indices, depth))
        else:
            wanted = [i + depth if i < 0 else i for i in indices]
        if not wanted or any(not 0 <= i < depth for i in wanted):
            raise IndexError(f"block indices {indices} out of range for depth {depth}")
        tokens, grid = self.embed(x, spacing, level=level)
        rope = self._rope(grid, tokens.device)
        out = {}
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            tokens = block(tokens, rope, self.num_prefix_tokens)
            if i in wanted:
                feat = self.norm(tokens) if norm else tokens
                out[i] = feat[:, self.num_prefix_tokens :].transpose(1, 2).reshape(len(x), -1, *grid)
        return [out[i] for i in wanted]  # one map per requested index, in the order requested
