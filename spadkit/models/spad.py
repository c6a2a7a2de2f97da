"""The SPAD-Nets spacing rule and the convolutions that follow it (PUMIT, arXiv 2312.07630).

One set of 3D weights serves isotropic 3D, anisotropic 3D and 2D inputs:

* The *anisotropy level* of a spacing ``(Z, Y, X)`` is
  ``d = floor(log2(clip(z / min(y, x), 1, 32)))``; a 2D image (one slice, depth
  spacing treated as infinite) gets the top level 5.
* A network halves the in-plane axes stage by stage. The depth axis is left
  alone for the first ``d`` in-plane halvings, which bring the in-plane spacing
  up to the slice spacing, and is halved together with them afterwards. A
  stride-16 patch embedding therefore has depth patch ``max(16 >> d, 1)``:
  16x16x16 at 1 mm, 4x16x16 at 0.75x0.75x3 mm, 1x16x16 for a 2D image.
* Where a layer must not reduce depth, its 3D kernel is *summed* over depth
  taps (in groups matching the smaller depth stride; a 3x3x3 kernel becomes
  1x3x3), never resized, so the 2D behaviour is the sum of the 3D filter.

Layers know their position: ``level`` is the number of in-plane halvings the
network applied before the layer's input, fixed by the architecture; the
batch's level ``d`` arrives at ``forward`` time.

On the CPU the layers compute the same sums through faster kernels (see
:func:`conv3d`, :func:`patchify_conv3d`, :func:`unpatchify_conv_transpose3d`):
PyTorch sends a float32 3x3x3 convolution of a single image to its native
``slow_conv3d`` (im2col + GEMM; 5-10x slower than oneDNN forward and backward
on UNETR's full-resolution decoder maps), and kernels equal to their stride are
a reshape and one matrix product.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Largest depth/in-plane spacing ratio the rule distinguishes (2D images sit at it).
MAX_RATIO = 32
MAX_LEVEL = int(math.log2(MAX_RATIO))


def anisotropy_level(spacing: Sequence[float], *, is_2d: bool = False) -> int:
    """``floor(log2(clip(z / min(y, x), 1, 32)))`` for a spacing ``(Z, Y, X)`` in mm.

    A 2D image (``is_2d``, or an infinite depth spacing) gets :data:`MAX_LEVEL`.

    Raises:
        ValueError: a spacing is zero, negative or NaN, or an in-plane spacing is infinite.
    """
    z, y, x = (float(s) for s in spacing)
    if not (0 < y < math.inf and 0 < x < math.inf) or (not is_2d and not z > 0):  # also rejects NaN and -inf
        raise ValueError(f"spacings must be positive and finite (depth may be inf for 2D), got {tuple(spacing)}")
    if is_2d or z == math.inf:
        return MAX_LEVEL
    ratio = min(max(z / min(y, x), 1.0), float(MAX_RATIO))
    return math.floor(math.log2(ratio) + 1e-9)


def depth_halvings(level: int, halvings: int, aniso_level: int) -> int:
    """How many of the in-plane halvings ``level + 1 .. level + halvings`` also halve depth."""
    return max(0, level + halvings - max(aniso_level, level))


def plan_downsampling(spacing: Sequence[float], stage_halvings: Sequence[int] = (4,), *, is_2d: bool = False) -> tuple[tuple[int, int, int], ...]:
    """Per-stage strides ``(z, y, x)`` for a network whose stages halve the in-plane axes
    ``stage_halvings[i]`` times each.

    Args:
        spacing: ``(Z, Y, X)`` in mm.
        stage_halvings: in-plane halvings per stage, e.g. ``(4,)`` for a stride-16 patch
            embedding or ``(2, 1, 1)`` for a 4-2-2 convolutional encoder.
        is_2d: the input is one slice.

    Returns:
        One ``(z, y, x)`` stride per stage; the product over stages is the total stride.

    Example:
        ``plan_downsampling((3.0, 0.75, 0.75))`` is ``((4, 16, 16),)``.
    """
    level_d = anisotropy_level(spacing, is_2d=is_2d)
    strides, level = [], 0
    for halvings in stage_halvings:
        if halvings < 0:
            raise ValueError(f"stage halvings must be >= 0, got {tuple(stage_halvings)}")
        strides.append((2 ** depth_halvings(level, halvings, level_d), 2**halvings, 2**halvings))
        level += halvings
    return tuple(strides)


def total_stride(spacing: Sequence[float], stage_halvings: Sequence[int] = (4,), *, is_2d: bool = False) -> tuple[int, int, int]:
    """Product of :func:`plan_downsampling`'s strides: voxels per token along ``(z, y, x)``."""
    return tuple(math.prod(s[a] for s in plan_downsampling(spacing, stage_halvings, is_2d=is_2d)) for a in range(3))


def batch_level(spacing: torch.Tensor | Sequence[float] | Sequence[Sequence[float]], depth: int) -> int:
    """The anisotropy level shared by a batch.

    Args:
        spacing: ``(3,)`` or ``(B, 3)`` spacings ``(Z, Y, X)`` in mm.
        depth: the batch's depth in voxels (1 means 2D).

    Raises:
        ValueError: the batch mixes levels (group batches by token grid; PatchStream does).
    """
    rows = torch.as_tensor(spacing, dtype=torch.float64).reshape(-1, 3).tolist()
    levels = {anisotropy_level(row, is_2d=depth == 1) for row in rows}
    if len(levels) != 1:
        raise ValueError(f"a batch must share one anisotropy level, got levels {sorted(levels)} for spacings {rows}")
    return levels.pop()


def _group_sum_depth(weight: torch.Tensor, taps: int, *, mean: bool = False) -> torch.Tensor:
    """Sum (or average) a kernel's depth taps in ``taps`` contiguous groups:
    ``(O, I, K, h, w) -> (O, I, taps, h, w)``."""
    if taps == weight.shape[2]:
        return weight
    o, i, k, h, w = weight.shape
    grouped = weight.reshape(o, i, taps, k // taps, h, w)
    return grouped.mean(dim=3) if mean else grouped.sum(dim=3)


#: Dtypes whose single-image CPU convolutions :func:`conv3d` splits (oneDNN's float32 path;
#: bfloat16 goes to oneDNN at any batch size, float64 has no oneDNN kernel).
SPLIT_DTYPES = frozenset({torch.float32})
#: ``B * C * Z * Y`` above which PyTorch already picks oneDNN for a single image
#: (``ConvParams::use_mkldnn`` in ATen's ConvUtils); splitting such inputs only copies them.
ONEDNN_MIN_ELEMENTS = 20480
_fast_kernels = True


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Run the SPAD layers through plain ``F.conv3d`` / ``F.conv_transpose3d`` inside the block.

    Process-wide (like ``torch.backends`` flags): for tests and benchmarks that compare the CPU
    fast paths with PyTorch's own kernels.
    """
    global _fast_kernels
    previous, _fast_kernels = _fast_kernels, False
    try:
        yield
    finally:
        _fast_kernels = previous


def _fast_on(x: torch.Tensor) -> bool:
    return _fast_kernels and x.device.type == "cpu"


def _conv_output(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int, int] = (1, 1, 1),
    padding: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """``F.conv3d`` that keeps a float32 CPU batch of one on oneDNN's kernels.

    PyTorch picks oneDNN (mkldnn) for a float32 CPU convolution with a 3x3 (or smaller)
    in-plane kernel only when the batch has two or more images or ``B * C * Z * Y``
    exceeds :data:`ONEDNN_MIN_ELEMENTS`; a single decoder patch falls to the native
    ``slow_conv3d``, 5-10x slower forward and backward (measured on 8-32 channel maps of
    16x32x32 and 8x64x64 voxels). Such an input is cut in two along its first spatial axis
    with two or more output positions, each half with the input rows its outputs read (a
    halo, zero-padded where the convolution pads), convolved as a batch of two and joined
    again: the same sums, equal up to float rounding (about 1e-6 relative). Every other
    input goes to ``F.conv3d`` unchanged (splitting a large one would only copy it: a
    8x96x112x96 map took 233 ms split against 144 ms whole).

    Args:
        x: ``(B, C, Z, Y, X)``.
        weight: ``(O, C, kz, ky, kx)``; bias: ``(O,)`` or ``None``.
        stride, padding: per axis ``(z, y, x)``, as ``F.conv3d``.

    Returns:
        ``(B, O, Z', Y', X')``, as ``F.conv3d(x, weight, bias, stride, padding)``.
    """
    native = x.shape[0] == 1 and math.prod(x.shape[:4]) <= ONEDNN_MIN_ELEMENTS and min(weight.shape[-2:]) <= 3
    if not (_fast_on(x) and x.dtype in SPLIT_DTYPES and native):
        return F.conv3d(x, weight, bias, stride, padding)
    kernel = weight.shape[2:]
    outputs = [_conv_output(n, k, s, p) for n, k, s, p in zip(x.shape[2:], kernel, stride, padding)]
    axis = next((a for a, n in enumerate(outputs) if n >= 2), None)
    if axis is None:
        return F.conv3d(x, weight, bias, stride, padding)
    half = -(-outputs[axis] // 2)  # output positions per half (the second may hold one extra, dropped)
    span = (half - 1) * stride[axis] + kernel[axis]  # input rows one half reads
    step = half * stride[axis]  # where the second half's rows start
    pad = [0] * 6  # F.pad order: x, y, z pairs
    pad[2 * (2 - axis)] = padding[axis]
    pad[2 * (2 - axis) + 1] = step + span - x.shape[2 + axis] - padding[axis]  # may be < 0: rows no output reads
    rows = F.pad(x, pad)
    halves = torch.cat([rows.narrow(2 + axis, 0, span), rows.narrow(2 + axis, step, span)])
    out = F.conv3d(halves, weight, bias, stride, tuple(0 if a == axis else p for a, p in enumerate(padding)))
    return torch.cat([out[:1], out[1:]], dim=2 + axis).narrow(2 + axis, 0, outputs[axis])


def patchify_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int, int]) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride)`` for a kernel equal to its stride, as one matrix product.

    Non-overlapping patches are a reshape: ``(B, C, Z, Y, X)`` ->
    ``(B, Z/sz * Y/sy * X/sx, C * sz * sy * sx)`` times the flattened ``(O, C, sz, sy, sx)``
    kernel gives ``(B, O, Z/sz, Y/sy, X/sx)``; trailing voxels that fill no patch are
    dropped, as the convolution drops them.
    """
    b, c = x.shape[:2]
    grid = [n // s for n, s in zip(x.shape[2:], stride)]
    (gz, gy, gx), (sz, sy, sx) = grid, stride
    x = x[:, :, : gz * sz, : gy * sy, : gx * sx].reshape(b, c, gz, sz, gy, sy, gx, sx)
    patches = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, gz * gy * gx, c * sz * sy * sx)
    out = F.linear(patches, weight.reshape(len(weight), -1), bias)
    return out.transpose(1, 2).reshape(b, -1, gz, gy, gx)


def unpatchify_conv_transpose3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int, int]) -> torch.Tensor:
    """``F.conv_transpose3d(x, weight, bias, stride)`` for a kernel equal to its stride, as one matrix product.

    Every output voxel receives exactly one kernel tap (a pixel shuffle): ``(B, I, gz, gy, gx)``
    times the flattened ``(I, O, sz, sy, sx)`` kernel, each token's ``O * sz * sy * sx``
    values laid out as its ``sz x sy x sx`` block of ``(B, O, gz * sz, gy * sy, gx * sx)``.
    """
    b, _, gz, gy, gx = x.shape
    cout = weight.shape[1]
    sz, sy, sx = stride
    blocks = x.flatten(2).transpose(1, 2) @ weight.reshape(len(weight), -1)  # (B, N, O * sz * sy * sx)
    out = blocks.reshape(b, gz, gy, gx, cout, sz, sy, sx).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, cout, gz * sz, gy * sy, gx * sx)
    return out if bias is None else out + bias.view(1, -1, 1, 1, 1)


class SpadConv3d(nn.Conv3d):
    """A 3D convolution whose depth stride and kernel follow the spacing rule.

    Two shapes are supported: *patchify* (``kernel_size == stride``, a power of
    two, no padding) and *3x3x3* (``kernel_size=3``, stride 1 or 2, padding 1).

    Args:
        level: in-plane halvings applied before this layer's input.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *, level: int = 0, bias: bool = True):
        patchify = kernel_size == stride and stride > 1 and stride & (stride - 1) == 0
        if not (patchify or (kernel_size == 3 and stride in (1, 2))):
            raise ValueError(f"SpadConv3d supports kernel == stride (a power of 2) or kernel 3 with stride 1/2, got {kernel_size}/{stride}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0 if patchify else 1, bias=bias)
        self.level = level
        self.patchify = patchify
        self.halvings = int(math.log2(stride))

    def forward(self, x: torch.Tensor, aniso_level: int) -> torch.Tensor:  # type: ignore[override]
        """``x``: ``(B, C, Z, Y, X)``; ``aniso_level``: the batch's level (:func:`batch_level`)."""
        s = self.stride[1]
        if self.patchify:
            depth_stride = 2 ** depth_halvings(self.level, self.halvings, aniso_level)
            weight = _group_sum_depth(self.weight, depth_stride)
            if _fast_on(x):
                return patchify_conv3d(x, weight, self.bias, (depth_stride, s, s))
            return F.conv3d(x, weight, self.bias, stride=(depth_stride, s, s))
        if self.level < aniso_level:  # depth still finer than in-plane: act as a 1x3x3 conv
            return conv3d(x, self.weight.sum(dim=2, keepdim=True), self.bias, stride=(1, s, s), padding=(0, 1, 1))
        return conv3d(x, self.weight, self.bias, self.stride, self.padding)


class SpadConvTranspose3d(nn.ConvTranspose3d):
    """Transposed patchify convolution (``kernel_size == stride``) undoing :class:`SpadConv3d`.

    Where depth must not grow, the kernel's depth taps are *averaged* (not summed as
    in :class:`SpadConv3d`): a thick output voxel stands for the thin voxels it
    covers, so it takes their mean and 2D outputs keep the 3D output's scale.

    Args:
        level: in-plane halvings of this layer's *input* (it returns ``level - log2(stride)``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, level: int, bias: bool = True):
        if stride < 2 or stride & (stride - 1):
            raise ValueError(f"SpadConvTranspose3d needs a power-of-2 stride, got {stride}")
        super().__init__(in_channels, out_channels, stride, stride, bias=bias)
        self.level = level
        self.halvings = int(math.log2(stride))

    def forward(self, x: torch.Tensor, aniso_level: int) -> torch.Tensor:  # type: ignore[override]
        s = self.stride[1]
        depth_stride = 2 ** depth_halvings(self.level - self.halvings, self.halvings, aniso_level)
        weight = _group_sum_depth(self.weight, depth_stride, mean=True)
        if _fast_on(x):
            return unpatchify_conv_transpose3d(x, weight, self.bias, (depth_stride, s, s))
        return F.conv_transpose3d(x, weight, self.bias, stride=(depth_stride, s, s))
