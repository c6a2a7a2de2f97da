"""The CPU fast paths of the SPAD convolutions compute the reference convolutions' sums.

``conv3d`` (a batch of one split in two for oneDNN), ``patchify_conv3d`` and
``unpatchify_conv_transpose3d`` (kernel == stride as one matrix product) must equal
``F.conv3d`` / ``F.conv_transpose3d`` to 1e-5 in float32, forward and gradients, on the
shapes SPAD-UNETR and SPAD-ViT meet: 3x3x3 and depth-summed 1x3x3 kernels at stride 1
and 2, odd and one-slice grids, and the label-efficiency patches (2x2x2 mm 16x32x32,
1x1x3 mm 8x64x64 voxels).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spadkit.models import create_model, spad
from spadkit.models.spad import (
    conv3d,
    patchify_conv3d,
    reference_kernels,
    unpatchify_conv_transpose3d,
)

#: float32 sums in another order (oneDNN, a matrix product) differ by rounding: compare each tensor to 1e-5
#: of its largest magnitude (a weight gradient sums ~10^5 products; element-wise 1e-5 would test the rounding).
RELATIVE_TOL = 1e-5


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=RELATIVE_TOL * float(want.abs().max().clamp_min(1.0)))


def _values_and_grads(fn, *tensors: torch.Tensor, seed: int = 1) -> list[torch.Tensor]:
    """``fn(*tensors)`` and the gradients of a fixed random projection of it w.r.t. every tensor."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * projection).sum().backward()
    return [out.detach(), *(leaf.grad for leaf in leaves)]


def _assert_same(fast, reference, *tensors: torch.Tensor) -> None:
    for got, want in zip(_values_and_grads(fast, *tensors), _values_and_grads(reference, *tensors), strict=True):
        assert_close_to_scale(got, want)


def _random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("shape", "kernel", "stride", "padding"),
    [
        ((1, 8, 16, 32, 32), (3, 3, 3), (1, 1, 1), (1, 1, 1)),  # 2x2x2 mm decoder, full resolution
        ((1, 16, 8, 16, 16), (3, 3, 3), (2, 2, 2), (1, 1, 1)),  # stride 2
        ((1, 8, 8, 64, 64), (1, 3, 3), (1, 1, 1), (0, 1, 1)),  # 1x1x3 mm: depth-summed 1x3x3
        ((1, 4, 7, 9, 10), (3, 3, 3), (1, 1, 1), (1, 1, 1)),  # odd depth: the second half's extra row is dropped
        ((1, 4, 5, 9, 9), (3, 3, 3), (2, 2, 2), (1, 1, 1)),  # odd outputs at stride 2
        ((1, 4, 1, 16, 16), (1, 3, 3), (1, 2, 2), (0, 1, 1)),  # one slice (2D): split in-plane
        ((1, 4, 1, 1, 1), (1, 3, 3), (1, 1, 1), (0, 1, 1)),  # nothing to split: plain conv
        ((2, 4, 8, 8, 8), (3, 3, 3), (1, 1, 1), (1, 1, 1)),  # a batch of two is left alone
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv3d_equals_f_conv3d(shape, kernel, stride, padding, bias):
    x = _random(*shape, seed=0)
    weight = _random(5, shape[1], *kernel, seed=1) * 0.1
    args = (x, weight, _random(5, seed=2)) if bias else (x, weight)
    _assert_same(lambda *t: conv3d(*t, stride=stride, padding=padding), lambda *t: F.conv3d(*t, stride=stride, padding=padding), *args)
    assert conv3d(x, weight, stride=stride, padding=padding).shape == F.conv3d(x, weight, stride=stride, padding=padding).shape


@pytest.mark.parametrize(
    ("shape", "stride"),
    [((1, 1, 16, 32, 32), (16, 16, 16)), ((2, 2, 8, 32, 48), (4, 16, 16)), ((1, 1, 1, 32, 32), (1, 16, 16)), ((1, 3, 9, 10, 11), (2, 2, 2))],
    ids=["embed-2mm", "embed-level2", "embed-2d", "ragged"],
)
def test_patchify_equals_strided_conv(shape, stride):
    x = _random(*shape, seed=0)
    weight, bias = _random(6, shape[1], *stride, seed=1) * 0.05, _random(6, seed=2)
    _assert_same(lambda *t: patchify_conv3d(*t, stride), lambda *t: F.conv3d(*t, stride=stride), x, weight, bias)


@pytest.mark.parametrize(("shape", "stride"), [((1, 16, 8, 16, 16), (2, 2, 2)), ((2, 8, 4, 32, 32), (1, 2, 2)), ((1, 6, 1, 2, 2), (1, 16, 16))])
def test_unpatchify_equals_transposed_conv(shape, stride):
    x = _random(*shape, seed=0)
    weight, bias = _random(shape[1], 4, *stride, seed=1) * 0.1, _random(4, seed=2)
    _assert_same(lambda *t: unpatchify_conv_transpose3d(*t, stride), lambda *t: F.conv_transpose3d(*t, stride=stride), x, weight, bias)


@pytest.mark.parametrize(
    ("spacing", "shape"),
    [((2.0, 2.0, 2.0), (16, 32, 32)), ((3.0, 1.0, 1.0), (8, 64, 64)), ((1.0, 1.0, 1.0), (1, 32, 32))],
    ids=["2mm", "1x1x3mm", "2d"],
)
def test_spad_unetr_fast_path_equals_reference(spacing, shape, monkeypatch):
    """The whole network, forward and every parameter's gradient, in float64 with the batch split
    switched on for float64 too: the split, patchify and pixel-shuffle arithmetic is checked exactly,
    apart from float32 rounding (a float32 SPAD-UNETR's own gradients differ from float64 by ~1%
    of their scale on these patches, through instance norms over 1x2x2 token maps)."""
    monkeypatch.setattr(spad, "SPLIT_DTYPES", frozenset({torch.float32, torch.float64}))
    torch.manual_seed(0)
    model = create_model("spad_unetr_test", num_classes=3).double().train()
    x = _random(1, 1, *shape, seed=3).double()

    def run() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = model(x, torch.tensor(spacing))
        (out * _random(*out.shape, seed=4).double()).sum().backward()
        return [out.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    fast = run()
    with reference_kernels():
        reference = run()
    assert len(fast) == len(reference) > 40
    for got, want in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, want)


def test_single_patch_step_avoids_native_slow_kernels():
    """A batch-1 float32 training step of SPAD-UNETR runs its 3x3x3 and transposed convolutions on
    oneDNN or as matrix products: no ``slow_conv3d`` / ``slow_conv_transpose3d`` (PyTorch's native
    CPU kernels the fast paths avoid) except on 1x1x1 kernels, where the native GEMM is the fast one."""
    torch.manual_seed(0)
    model = create_model("spad_unetr_test", num_classes=2).train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        model(torch.rand(1, 1, 16, 32, 32), torch.tensor((2.0, 2.0, 2.0))).sum().backward()
    assert _slow_kernels(prof) == []
    with reference_kernels(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        model(torch.rand(1, 1, 16, 32, 32), torch.tensor((2.0, 2.0, 2.0))).sum().backward()
    assert "aten::slow_conv3d_forward" in _slow_kernels(prof)  # the reference path does hit it


def _slow_kernels(prof: torch.profiler.profile) -> list[str]:
    events = prof.key_averages(group_by_input_shape=True)
    assert any(e.key == "aten::mkldnn_convolution" for e in events)
    return sorted({e.key for e in events if "slow_conv" in e.key and e.input_shapes[1][2:] != [1, 1, 1]})
