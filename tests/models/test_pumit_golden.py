"""Golden tests against PUMIT's arithmetic (github function2-llx/PUMIT, master, pumit/sac.py,
pumit/model/{vit,rope,mim}.py, pumit/datamodule.py), restated here with torch and einops.

Where spadkit deliberately differs, the test asserts the difference:
* transposed convolutions *average* depth taps where PUMIT sums them;
* a 2D position embedding adds its cls entry (index 0) to the cls token, PUMIT index 1;
* the anisotropy level tolerates float noise just below a power of two (PUMIT truncates);
* the MIM mask holds ``round(N * r)`` tokens; PUMIT's ``N - int(N * (1 - r))`` is one more at r = 0.55.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spadkit.models import (
    SpadConv3d,
    SpadConvTranspose3d,
    anisotropy_level,
    create_model,
    load_pumit_weights,
)
from spadkit.models.spad import depth_halvings
from spadkit.models.vit import rope_tables

einops = pytest.importorskip("einops")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------- PUMIT, restated
def pumit_aniso_d(spacing: tuple[float, float, float]) -> int:
    """pumit/datamodule.py: ``rz = clip(z / min(y, x), 1, 32); aniso_d = int(rz).bit_length() - 1``."""
    rz = np.clip(spacing[0] / min(spacing[1:]), 1, 16 << 1)
    return int(rz).bit_length() - 1


def pumit_conv(conv: nn.Conv3d, x: torch.Tensor, aniso_d: int, num_downsamples: int) -> torch.Tensor:
    """sac.InflatableConv3d.forward (adaptive) for an input that has seen ``num_downsamples`` halvings."""
    pending = max(aniso_d - num_downsamples, 0)
    stride, padding = list(conv.stride), list(conv.padding)
    stride[0] = max(conv.stride[0] >> pending, 1)
    if stride[0] == conv.stride[0] and pending == 0:
        weight = conv.weight
    else:
        padding[0] = 0
        if stride[0] == 1:
            weight = conv.weight.sum(dim=2, keepdim=True)
        else:
            weight = einops.reduce(conv.weight, "co ci (dr dc) ... -> co ci dr ...", "sum", dr=stride[0])
    return F.conv3d(x, weight, conv.bias, stride, padding)


def pumit_transposed_conv(conv: nn.ConvTranspose3d, x: torch.Tensor, aniso_d: int, num_downsamples: int) -> torch.Tensor:
    """sac.InflatableTransposedConv3d.forward: depth taps *summed* in groups."""
    remained = max(num_downsamples - aniso_d, 0)
    stride = list(conv.stride)
    stride[0] = min(1 << remained, conv.stride[0])
    weight = conv.weight if stride[0] == conv.stride[0] else einops.reduce(conv.weight, "co ci (dr dc) ... -> co ci dr ...", "sum", dr=stride[0])
    return F.conv_transpose3d(x, weight, conv.bias, stride)


def pumit_rotation(dim: int, shape: tuple[int, int, int], base=(2333.0, 10000.0, 10000.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """rope.SpatialRotaryEmbedding(dim, (-1, -1, -1), base, merge_hw=True).get_rotation(shape)."""
    half = dim >> 1
    omega = []
    for i in range(3):
        if i > 0:
            exp = -torch.arange(0, half, 2) / half
        else:
            exp = einops.repeat(-torch.arange(1, half, 2) / half, "... -> (r ...)", r=2)
        omega.append(torch.pow(base[i], exp))
    theta = [torch.outer(torch.arange(shape[i]).float(), omega[i]) for i in range(3)]
    hw = torch.cat(torch.broadcast_tensors(theta[1][:, None], theta[2][None, :]), -1)
    theta = einops.rearrange(theta[0][:, None, None] + hw[None, :], "... d -> (...) d")
    return theta.cos(), theta.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = einops.rearrange(x, "... (d r) -> r ... d", r=2)
    return einops.rearrange([-x2, x1], "r ... d -> ... (d r)")


class PumitAttention(nn.Module):
    """vit.Attention(sub_ln=True, qkv_bias=True); tokens ``n l (nh d)``, as xformers' layout."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        heads = lambda t: einops.rearrange(t, "n l (nh d) -> n l nh d", nh=self.num_heads)  # noqa: E731
        q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = heads(F.linear(x, self.k_proj.weight))
        v = heads(F.linear(x, self.v_proj.weight, self.v_bias))
        rope = lambda t: torch.cat([t[:, :1], t[:, 1:] * cos + rotate_half(t[:, 1:]) * sin], dim=1)  # noqa: E731
        q, k = rope(q), rope(k)
        scores = torch.einsum("nqhd,nkhd->nhqk", q, k) * q.shape[-1] ** -0.5
        out = torch.einsum("nhqk,nkhd->nqhd", scores.softmax(dim=-1), v)
        return self.proj(einops.rearrange(out, "n l nh d -> n l (nh d)"))


class PumitSwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(nn.SiLU()(self.w1(x)) * self.w2(x)))


class PumitBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = PumitAttention(dim, num_heads)
        self.mlp = PumitSwiGLU(dim, int(dim * 8 / 3))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


def pumit_resample(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """sac.resample."""
    down = tuple(np.minimum(x.shape[2:], shape))
    if down != x.shape[2:]:
        x = F.interpolate(x, down, mode="area")
    if tuple(shape) != x.shape[2:]:
        x = F.interpolate(x, shape, mode="trilinear")
    return x


class PumitViT(nn.Module):
    """vit.ViT (adaptive patch embedding, RGB input, no mask tokens) with ViTForMIM's ``mask_token``/``mim_head``."""

    def __init__(self, dim: int = 64, depth: int = 2, num_heads: int = 2, pos: tuple[int, int, int] = (2, 4, 4)):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(3, dim, 16, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, dim, *pos) * 0.02)
        self.blocks = nn.ModuleList(PumitBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.mim_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 32))
        self.head_dim = dim // num_heads

    def forward(self, x: torch.Tensor, aniso_d: int) -> torch.Tensor:
        x = pumit_conv(self.patch_embed.proj, x, aniso_d, 0)
        shape = tuple(x.shape[2:])
        x = x + pumit_resample(self.pos_embed, shape)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), einops.rearrange(x, "n c ... -> n (...) c")], dim=1)
        cos, sin = pumit_rotation(self.head_dim, shape)
        cos, sin = (einops.repeat(t, "l d -> l 1 (d r)", r=2) for t in (cos, sin))
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)


def pumit_load_rules(state: dict[str, torch.Tensor], depth: int, pos_grid: tuple[int, int, int], pretrained_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """vit.ViT._load_from_state_dict for an EVA-02 2D checkpoint (PUMIT's rule, index 1 included)."""
    state = {k: v for k, v in state.items() if not k.endswith(("rope.freqs_cos", "rope.freqs_sin"))}
    weight = state["patch_embed.proj.weight"]
    weight = F.interpolate(weight.float(), (16, 16), mode="bicubic")
    state["patch_embed.proj.weight"] = einops.repeat(weight / depth, "co ci ... -> co ci d ...", d=depth)
    cls_pos, pos = state["pos_embed"][:, 1], state["pos_embed"][:, 1:]
    state["cls_token"] = state["cls_token"] + cls_pos
    h, w = pretrained_hw
    pos = einops.repeat(pos, "1 (h w) c -> 1 c d h w", d=pos_grid[0], h=h, w=w)
    state["pos_embed"] = pumit_resample(pos, pos_grid)
    return state


def _randomise(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            is_norm_scale = name.endswith("weight") and ("norm" in name or "ffn_ln" in name)
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + is_norm_scale)


INPUTS = [((32, 32, 32), (1.0, 1.0, 1.0)), ((8, 32, 32), (4.0, 1.0, 1.0)), ((1, 32, 48), (1.0, 0.7, 0.7))]


# ---------------------------------------------------------------------- arithmetic
def test_anisotropy_level_matches_pumit():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        xy = rng.uniform(0.2, 2.0)
        spacing = (rng.uniform(0.2, 80.0), xy, xy * rng.uniform(1.0, 1.5))
        assert anisotropy_level(spacing) == pumit_aniso_d(spacing), spacing
    assert anisotropy_level((2.0, 1.0, 1.0)) == pumit_aniso_d((2.0, 1.0, 1.0)) == 1
    noisy = (3.0, 1.5000000000000002, 1.5000000000000002)  # 3 / 1.5 in floating point: 1.9999999999999998
    assert (anisotropy_level(noisy), pumit_aniso_d(noisy)) == (1, 0)  # deliberate: spadkit tolerates float noise


def test_depth_strides_match_pumit():
    for level in range(6):
        for halvings in range(5):
            for aniso in range(6):
                pumit = max((1 << halvings) >> max(aniso - level, 0), 1)
                assert 2 ** depth_halvings(level, halvings, aniso) == pumit


@pytest.mark.parametrize(("kernel", "stride", "level"), [(16, 16, 0), (4, 4, 1), (2, 2, 3), (3, 1, 2), (3, 2, 1)])
@pytest.mark.parametrize("aniso", [0, 1, 2, 3, 5])
def test_spad_conv_matches_pumit(kernel, stride, level, aniso):
    torch.manual_seed(0)
    conv = SpadConv3d(2, 3, kernel, stride, level=level)
    depth = 1 if aniso == 5 else max(16 >> max(aniso - level, 0), 1) * 2
    x = torch.randn(1, 2, depth, 16, 16)
    torch.testing.assert_close(conv(x, aniso), pumit_conv(conv, x, aniso, level))


@pytest.mark.parametrize(("stride", "level"), [(16, 4), (2, 3), (4, 2)])
@pytest.mark.parametrize("aniso", [0, 1, 2, 3, 5])
def test_transposed_conv_averages_where_pumit_sums(stride, level, aniso):
    torch.manual_seed(0)
    conv = SpadConvTranspose3d(3, 2, stride, level=level)
    x = torch.randn(1, 3, 2, 2, 2)
    halvings = int(math.log2(stride))
    group = stride // min(1 << max(level - aniso, 0), stride)  # depth taps PUMIT sums into one
    bias = conv.bias.view(1, -1, 1, 1, 1)
    ours, pumit = conv(x, aniso), pumit_transposed_conv(conv, x, aniso, level)
    assert ours.shape == pumit.shape and ours.shape[2] == 2 * 2 ** depth_halvings(level - halvings, halvings, aniso)
    torch.testing.assert_close((ours - bias) * group, pumit - bias)
    if group > 1:
        assert not torch.allclose(ours, pumit)


@pytest.mark.parametrize("grid", [(2, 3, 4), (1, 5, 5), (5, 10, 10)])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_rope_tables_match_pumit(grid, head_dim):
    cos, sin = rope_tables(grid, head_dim, "cpu")
    pumit_cos, pumit_sin = pumit_rotation(head_dim, grid)
    torch.testing.assert_close(cos, pumit_cos, rtol=0, atol=2e-5)  # spadkit computes angles in float64
    torch.testing.assert_close(sin, pumit_sin, rtol=0, atol=2e-5)


def test_mask_count_against_pumit():
    """PUMIT keeps ``int(N * (1 - r))`` tokens visible; spadkit masks ``round(N * r)``. At r = 0.55,
    ``1 - r`` is 0.44999999999999996 in floating point, so on its own grids PUMIT masks one token more
    than the ratio says (276 of 500 on (5, 10, 10), 56 of 100 on (1, 10, 10)); spadkit masks 275 and 55."""
    from spadkit.tasks.pretrain import MIMPretrain

    fake = SimpleNamespace(hparams=SimpleNamespace(mask_ratio=0.55), device="cpu")
    for tokens, pumit, ours in ((500, 276, 275), (100, 56, 55), (8, 5, 4)):
        assert tokens - int(tokens * (1 - 0.55)) == pumit
        mask = MIMPretrain.random_mask(fake, 3, tokens, torch.Generator().manual_seed(0))
        assert (mask.sum(dim=1) == ours).all()


# ---------------------------------------------------------------------- weights
def test_pumit_checkpoint_loads_and_forwards_as_pumit():
    """A PUMIT-B-style Lightning checkpoint (RGB, ImageNet-normalised input) loaded into spad_eva_test
    gives PUMIT's features on the grey image, at isotropic, anisotropic and 2D spacings."""
    pumit = PumitViT().eval()
    _randomise(pumit, 0)
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in pumit.state_dict().items()}, "epoch": 3}
    checkpoint["state_dict"]["model.tokenizer.quantize.embedding.weight"] = torch.zeros(32, 8)
    model = create_model("spad_eva_test", pos_grid=(2, 4, 4)).eval()
    report = load_pumit_weights(model, checkpoint)
    assert report.missing == [] and {"mim_head.0.weight", "tokenizer.quantize.embedding.weight"} <= set(report.dropped)
    torch.testing.assert_close(model.mask_token, pumit.mask_token)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    for shape, spacing in INPUTS:
        grey = torch.rand(2, 1, *shape)
        expected = pumit((grey.expand(-1, 3, -1, -1, -1) - mean) / std, anisotropy_level(spacing, is_2d=shape[0] == 1))
        torch.testing.assert_close(model.forward_features(grey, spacing), expected, rtol=1e-4, atol=1e-4)


def test_eva02_2d_weights_inflate_as_pumit():
    """An EVA-02 2D state dict (14x14 RGB patches, (1, 1 + 4*4, C) position embedding, EVA's extra keys)
    gives PUMIT's model with PUMIT's cls rule, and the cls token's own position embedding by default."""
    pumit = PumitViT().eval()
    _randomise(pumit, 1)
    eva = {k: v.clone() for k, v in pumit.state_dict().items() if not k.startswith("mim_head")}  # not views of pumit
    generator = torch.Generator().manual_seed(2)
    eva["patch_embed.proj.weight"] = torch.randn(64, 3, 14, 14, generator=generator) * 0.05
    eva["pos_embed"] = torch.randn(1, 1 + 16, 64, generator=generator) * 0.5
    eva["rope.freqs_cos"] = torch.ones(16, 32)
    eva["blocks.0.attn.inner_attn_ln.weight"] = torch.ones(64)
    pumit.load_state_dict(pumit_load_rules({k: v for k, v in eva.items() if "inner_attn_ln" not in k}, 16, (2, 4, 4), (4, 4)), strict=False)
    model = create_model("spad_eva_test", pos_grid=(2, 4, 4)).eval()
    report = load_pumit_weights(model, {"module": eva}, cls_pos_index=1)
    assert "blocks.0.attn.inner_attn_ln.weight" in report.dropped and "rope.freqs_cos" in report.dropped
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    for shape, spacing in INPUTS:
        grey = torch.rand(1, 1, *shape)
        expected = pumit((grey.expand(-1, 3, -1, -1, -1) - mean) / std, anisotropy_level(spacing, is_2d=shape[0] == 1))
        torch.testing.assert_close(model.forward_features(grey, spacing), expected, rtol=1e-4, atol=1e-4)
    load_pumit_weights(model, {"module": eva})  # default: the cls entry (index 0)
    torch.testing.assert_close(model.cls_token, eva["cls_token"] + eva["pos_embed"][:, :1])
    # a constant-in-depth 3D patch answers as the (resized) 2D kernel on one slice
    plane = torch.rand(1, 1, 1, 16, 16)
    kernel2d = F.interpolate(eva["patch_embed.proj.weight"], (16, 16), mode="bicubic")
    folded = (kernel2d / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    torch.testing.assert_close(
        F.conv3d(plane.expand(-1, -1, 16, -1, -1), model.patch_embed.weight) + 0, F.conv2d(plane[:, :, 0], folded)[:, :, None], rtol=1e-4, atol=1e-4
    )


def test_wrong_architecture_is_a_clear_error():
    from spadkit.errors import CorruptFileError

    pumit = PumitViT(dim=64, depth=2)
    model = create_model("spad_eva_test", depth=3)
    with pytest.raises(CorruptFileError, match="spad_eva_base"):
        load_pumit_weights(model, pumit.state_dict())
    report = load_pumit_weights(model, pumit.state_dict(), strict=False)
    assert any(k.startswith("blocks.2.") for k in report.missing)
