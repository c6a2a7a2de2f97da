"""SPAD-EVA: the EVA-02-style SPAD-ViT that PUMIT pretrains (``pumit.model.vit.ViT``).

Same spacing-adaptive patch embedding, position-embedding grid and 3D rotary
embedding as :class:`~spadkit.models.vit.SpadViT` (it *is* a ``SpadViT``: every
forward, ``forward_intermediates`` and ``feature_info`` are inherited), with
PUMIT's block:

* attention with separate ``q_proj``/``k_proj``/``v_proj`` (no bias) plus
  learnable ``q_bias`` and ``v_bias`` (keys get none, as in EVA-02/BEiT);
* a SwiGLU MLP with sub-LN: ``w3(ffn_ln(silu(w1(x)) * w2(x)))``, hidden width
  ``int(dim * 8 / 3)`` (2048 for ViT-B);
* every LayerNorm with PyTorch's default ``eps = 1e-5`` (PUMIT's; SpadViT uses 1e-6).

Parameter names follow PUMIT's, so its released checkpoints map onto this
model key for key (see :mod:`spadkit.models.pumit_weights`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spadkit.models.vit import PATCH, Attention, SpadViT, apply_rope

#: PUMIT's LayerNorm epsilon (``nn.LayerNorm`` default).
EVA_EPS = 1e-5
#: PUMIT's SwiGLU width ratio.
EVA_MLP_RATIO = 8 / 3


class EvaAttention(Attention):
    """Multi-head attention with q/v biases only; ``forward(x, rope, prefix)`` as SpadViT's."""

    def __init__(self, dim: int, num_heads: int, qv_bias: bool = True):
        super().__init__(dim, num_heads)  # head-size check, num_heads, proj
        del self.qkv  # separate projections, as PUMIT's checkpoints store them
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, prefix: int) -> torch.Tensor:
        q = self._heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = self._heads(self.k_proj(x))
        v = self._heads(F.linear(x, self.v_proj.weight, self.v_bias))
        if rope is not None:  # the prefix (cls) tokens are not rotated
            q = torch.cat([q[:, :, :prefix], apply_rope(q[:, :, prefix:], *rope)], dim=2)
            k = torch.cat([k[:, :, :prefix], apply_rope(k[:, :, prefix:], *rope)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """``w3(ffn_ln(silu(w1(x)) * w2(x)))`` (sub-LN: the norm sits inside the MLP)."""

    def __init__(self, dim: int, hidden: int, sub_ln: bool = True):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=EVA_EPS) if sub_ln else nn.Identity()
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EvaBlock(nn.Module):
    """Pre-norm block: :class:`EvaAttention` and :class:`SwiGLU`, each with a residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = EVA_MLP_RATIO, qv_bias: bool = True, sub_ln: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EVA_EPS)
        self.attn = EvaAttention(dim, num_heads, qv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=EVA_EPS)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), sub_ln)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, prefix: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, prefix)
        return x + self.mlp(self.norm2(x))


class SpadEva(SpadViT):
    """SPAD-ViT with PUMIT's EVA-02 blocks (see the module docstring).

    Args:
        embed_dim, depth, num_heads: transformer size.
        mlp_ratio: SwiGLU hidden width over ``embed_dim`` (PUMIT: 8/3).
        qv_bias: learnable query and value biases.
        sub_ln: LayerNorm inside the SwiGLU.
        **kwargs: :class:`SpadViT`'s ``in_chans``, ``pos_grid``, ``rope``, ``num_classes``.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = EVA_MLP_RATIO,
        qv_bias: bool = True,
        sub_ln: bool = True,
        **kwargs: Any,
    ):
        super().__init__(embed_dim=embed_dim, depth=0, num_heads=num_heads, **kwargs)
        self.blocks = nn.ModuleList(EvaBlock(embed_dim, num_heads, mlp_ratio, qv_bias, sub_ln) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=EVA_EPS)
        self.feature_info = [{"num_chs": embed_dim, "reduction": PATCH, "module": f"blocks.{i}"} for i in range(depth)]
        self._init_weights()
