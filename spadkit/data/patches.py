"""Patch geometry: how big a patch is for a given spacing, and where it is taken.

All shapes, starts and sizes here are ``(Z, Y, X)`` in voxels of the level
being read; spacings are ``(Z, Y, X)`` in mm. A window may reach outside the
volume (a case shorter than the patch along an axis): the reader pads it, so
no sampler ever has to shrink a patch.

Samplers:

* :class:`UniformSampler`: every position of the patch inside the volume is equally likely.
* :class:`LabelSampler`: with probability ``foreground_ratio`` the patch is centred
  on a voxel of a randomly chosen foreground class (nnU-Net's oversampling),
  otherwise uniform.
* :func:`grid_windows`: overlapping windows that tile a volume, for inference.

A partially annotated case (a label version whose annotated mask covers a few
slices) passes ``annotated``, the coordinates of its annotated voxels: every
patch then contains annotated voxels. :class:`UniformSampler` takes a window
around a random annotated voxel (:func:`overlapping_start`), :class:`LabelSampler`
centres on an annotated voxel of a foreground class (``locations`` then hold
annotated voxels only) or, otherwise, on any annotated voxel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from spadkit.models.spad import MAX_LEVEL, anisotropy_level, total_stride

Shape3 = tuple[int, int, int]
Spacing3 = tuple[float, float, float]
Multiple = int | Sequence[int] | Callable[[Spacing3], Sequence[int]]


@dataclass(frozen=True)
class PatchSize:
    """How big a training patch is, as a function of the case's spacing.

    Give exactly one of ``voxels``, ``mm`` and ``tokens``.

    Args:
        voxels: patch edge in voxels ``(Z, Y, X)`` (or one int for a cube). With
            ``spacing_aware=True`` it holds along the case's finest axis and the
            other axes cover the same physical extent: 96^3 voxels becomes
            32 x 96 x 96 on a 3 x 1 x 1 mm volume. With ``spacing_aware=False`` every
            case gets exactly this many voxels.
        mm: physical patch extent ``(Z, Y, X)`` in mm (always spacing-aware).
        tokens: a fixed token grid ``(Z, Y, X)``, as PUMIT crops: every patch has
            ``tokens * multiple(spacing)`` voxels (``(5, 10, 10)`` tokens are
            80 x 160 x 160 voxels at 1 mm, 20 x 160 x 160 at 0.75 x 0.75 x 3 mm), and
            cases of anisotropy level 5 (2D images and slice/pixel ratios >= 32) get one
            depth token. The crop's physical size is set by a random ``zoom`` (see below):
            the stream reads ``zoom`` times the voxels and resamples them to the grid.
        spacing_aware: see ``voxels``.
        multiple: every patch edge is rounded to a multiple of this, per axis: an int,
            a ``(Z, Y, X)`` tuple, or a function of the spacing returning one (the
            model's total stride from its spacing rule, so the token grid is whole).
            With ``tokens`` it is the voxels per token and defaults to
            :func:`spadkit.models.total_stride` (SPAD-ViT's stride-16 embedding).
        zoom: in-plane zoom range of ``tokens`` crops (PUMIT: 0.75-2): each crop covers
            ``zoom`` times the stored voxels in Y and X (bounded by the case's in-plane
            size), so a zoom of 2 halves the resolution.
        zoom_prob: probability of an in-plane zoom (else 1; PUMIT 0.5).
        zoom_z: depth zoom range (PUMIT: 0.8-1.25), drawn only for near-isotropic
            cases (slice spacing <= ``isotropic_ratio`` x pixel spacing).
        zoom_z_prob: probability of a depth zoom for such cases (PUMIT 0.3).
        isotropic_ratio: see ``zoom_z`` (PUMIT 1.5).

    A 2D image (one slice) always gets a one-slice patch. Unlike PUMIT, a zoom never
    moves a case to another anisotropy level: where PUMIT's draw would, the zoom
    range is narrowed to the case's level, so a case's voxel shape and level are
    fixed and the epoch plan can batch cases before reading them.
    """

    voxels: int | Sequence[int] | None = None
    mm: float | Sequence[float] | None = None
    tokens: int | Sequence[int] | None = None
    spacing_aware: bool = True
    multiple: Multiple = 1
    zoom: tuple[float, float] = (0.75, 2.0)
    zoom_prob: float = 0.5
    zoom_z: tuple[float, float] = (0.8, 1.25)
    zoom_z_prob: float = 0.3
    isotropic_ratio: float = 1.5

    def __post_init__(self) -> None:
        given = [v for v in (self.voxels, self.mm, self.tokens) if v is not None]
        if len(given) != 1:
            raise ValueError("give the patch size in exactly one of voxels, mm or tokens")
        for value in _triple(given[0]):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"patch sizes must be positive, got {given[0]}")
        if self.tokens is not None and any(int(t) != t for t in _triple(self.tokens)):
            raise ValueError(f"tokens must be whole numbers, got {self.tokens}")
        for name, (lo, hi) in (("zoom", self.zoom), ("zoom_z", self.zoom_z)):
            if not 0 < lo <= hi < math.inf:
                raise ValueError(f"{name} must be a range (low, high) with 0 < low <= high, got {(lo, hi)}")
        for name, p in (("zoom_prob", self.zoom_prob), ("zoom_z_prob", self.zoom_z_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")

    def level_for(self, spacing: Sequence[float], spatial_shape: Sequence[int]) -> int:
        """SPAD anisotropy level of a case (5 for a one-slice image), see :func:`spadkit.models.anisotropy_level`."""
        return anisotropy_level(spacing, is_2d=spatial_shape[0] == 1)

    def shape_for(self, spacing: Sequence[float], spatial_shape: Sequence[int]) -> Shape3:
        """Patch shape ``(Z, Y, X)`` in voxels for a case of this spacing and shape."""
        is_2d = spatial_shape[0] == 1
        spacing = tuple(float(s) for s in spacing)
        if self.tokens is not None:
            stride = _multiple(total_stride if self.multiple == 1 else self.multiple, spacing)
            tokens = [int(t) for t in _triple(self.tokens)]
            if self.level_for(spacing, spatial_shape) == MAX_LEVEL:
                tokens[0] = 1
            shape = [t * s for t, s in zip(tokens, stride)]
            if is_2d:
                shape[0] = 1
            return (int(shape[0]), int(shape[1]), int(shape[2]))
        multiple = _multiple(self.multiple, spacing)
        if self.mm is not None:
            voxels = [e / s for e, s in zip(_triple(self.mm), spacing)]
        elif self.spacing_aware:
            finest = min(spacing[1:]) if is_2d else min(spacing)
            voxels = [v * finest / s for v, s in zip(_triple(self.voxels), spacing)]
        else:
            voxels = list(_triple(self.voxels))
        shape = [max(m, m * round(v / m)) for v, m in zip(voxels, multiple)]
        if is_2d:
            shape[0] = 1
        return (int(shape[0]), int(shape[1]), int(shape[2]))

    def draw_zoom(self, spacing: Sequence[float], spatial_shape: Sequence[int], rng: np.random.Generator) -> Spacing3:
        """PUMIT's random zoom ``(z, y, x)`` of one ``tokens`` crop (``(1, 1, 1)`` in the other modes).

        The crop covers ``zoom * patch`` stored voxels. In-plane: with probability
        ``zoom_prob`` uniform in ``zoom``, its top capped at the case's in-plane size
        over the patch's (PUMIT's bound; a case smaller than the patch draws between
        the cap and ``zoom[0]``). Depth: with probability ``zoom_z_prob`` uniform in
        ``zoom_z`` for near-isotropic 3D cases. The in-plane draw is then narrowed to
        the zooms that keep the case's anisotropy level (see the class docstring).
        """
        if self.tokens is None:
            return (1.0, 1.0, 1.0)
        z, y, x = (float(s) for s in spacing)
        is_2d = spatial_shape[0] == 1
        patch = self.shape_for(spacing, spatial_shape)
        inplane_on, depth_on = rng.random() < self.zoom_prob, rng.random() < self.zoom_z_prob
        u_inplane, u_depth = rng.random(), rng.random()
        zoom_z = 1.0
        if depth_on and not is_2d and z <= self.isotropic_ratio * min(y, x):
            zoom_z = self.zoom_z[0] + u_depth * (self.zoom_z[1] - self.zoom_z[0])
        if not inplane_on:
            return (zoom_z, 1.0, 1.0)
        cap = min(s / p for s, p in zip(spatial_shape[1:], patch[1:]))
        lo, hi = sorted((self.zoom[0], min(self.zoom[1], cap)))
        if not is_2d:  # keep floor(log2(ratio)) of the zoomed spacing, with a margin for rounding
            level = self.level_for(spacing, spatial_shape)
            ratio = z * zoom_z / min(y, x)
            if level < MAX_LEVEL:
                lo = max(lo, ratio / 2 ** (level + 1) * (1 + 1e-3))
            if level > 0:
                hi = min(hi, ratio / 2**level * (1 - 1e-3))
            if lo > hi:
                return (zoom_z, 1.0, 1.0)
        zoom_xy = lo + u_inplane * (hi - lo)
        return (zoom_z, zoom_xy, zoom_xy)


def _triple(value: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (value, value, value)
    if len(value) != 3:
        raise ValueError(f"expected one value or three (Z, Y, X), got {value!r}")
    return tuple(value)


def _multiple(multiple: Multiple, spacing: Spacing3) -> tuple[int, int, int]:
    value = multiple(spacing) if callable(multiple) else multiple
    triple = _triple(value)
    if any(int(m) != m or m < 1 for m in triple):
        raise ValueError(f"patch multiples must be positive integers, got {value!r}")
    return tuple(int(m) for m in triple)


#: The coarsest axis is moved first only when it is at least this much coarser than the finest.
COARSE_AXIS_RATIO = 1.5


def coarse_axis_first(spacing: Sequence[float], spatial_shape: Sequence[int]) -> Shape3:
    """Axis order that puts the coarsest axis first, as the spacing rule expects (thick slices along Z).

    Stores keep RAS orientation, so a sagittal or coronal stack has its thick
    slices along X or Y. Returns ``axes`` such that output axis ``i`` is stored
    axis ``axes[i]``; ``(0, 1, 2)`` when Z is already coarsest, the volume is 2D,
    or no axis is :data:`COARSE_AXIS_RATIO` times coarser than the finest.
    """
    if spatial_shape[0] == 1:
        return (0, 1, 2)
    coarse = int(np.argmax(spacing))
    if coarse == 0 or max(spacing) < COARSE_AXIS_RATIO * min(spacing):
        return (0, 1, 2)
    return (coarse, *(a for a in (0, 1, 2) if a != coarse))


def window_slices(start: Sequence[int], size: Sequence[int], shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Clamp a window to a volume.

    Returns:
        ``(source, target)``: slices into the volume and into the ``size``-shaped
        patch; voxels of the patch outside ``target`` are padding. Both are empty
        slices along an axis where the window misses the volume entirely.
    """
    source, target = [], []
    for s0, n, length in zip(start, size, shape):
        lo, hi = max(s0, 0), min(s0 + n, length)
        hi = max(hi, lo)
        source.append(slice(lo, hi))
        target.append(slice(lo - s0, hi - s0))
    return tuple(source), tuple(target)


def uniform_start(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator) -> Shape3:
    """A uniformly random window start. Where the volume is shorter than the patch
    the volume lands at a random offset inside it (the rest is padding)."""
    starts = []
    for length, size in zip(shape, patch):
        if length >= size:
            starts.append(int(rng.integers(0, length - size + 1)))
        else:
            starts.append(-int(rng.integers(0, size - length + 1)))
    return tuple(starts)


def centred_start(centre: Sequence[int], shape: Sequence[int], patch: Sequence[int]) -> Shape3:
    """Start of a window around ``centre``, moved inside the volume where it fits."""
    starts = []
    for c, length, size in zip(centre, shape, patch):
        start = int(c) - size // 2
        if length >= size:
            start = min(max(start, 0), length - size)
        else:
            start = -((size - length) // 2)
        starts.append(start)
    return tuple(starts)


def overlapping_start(shape: Sequence[int], patch: Sequence[int], annotated: np.ndarray, rng: np.random.Generator) -> Shape3:
    """A window that contains a random voxel of ``annotated`` ``(N, 3)`` ``(z, y, x)``: the voxel is
    drawn uniformly, then the start uniformly among the windows inside the volume that hold it
    (where the volume is shorter than the patch, as :func:`uniform_start`). A window thus comes up
    in proportion to the annotated voxels it holds.

    Raises:
        ValueError: ``annotated`` is empty.
    """
    voxel = _random_row(annotated, rng)
    starts = []
    for v, length, size in zip(voxel, shape, patch):
        if length >= size:
            starts.append(int(rng.integers(max(0, int(v) - size + 1), min(int(v), length - size) + 1)))
        else:
            starts.append(-int(rng.integers(0, size - length + 1)))
    return tuple(starts)


def box_start(shape: Shape3, patch: Shape3, corners: np.ndarray, rng: np.random.Generator) -> Shape3:
    """A window that overlaps a random box of ``corners`` ``(N, 6)`` (voxel edges ``z0, y0, x0, z1, y1, x1``,
    half-open): a random voxel of the box (uniform), then as :func:`overlapping_start`.

    Raises:
        ValueError: ``corners`` is empty.
    """
    low, high = _random_row(corners, rng).reshape(2, 3)
    first = np.clip(np.floor(low), 0, np.asarray(shape) - 1).astype(np.int64)
    last = np.clip(np.ceil(high) - 1, first, np.asarray(shape) - 1).astype(np.int64)
    voxel = [int(rng.integers(a, b + 1)) for a, b in zip(first, last)]
    return overlapping_start(shape, patch, np.asarray([voxel]), rng)


def _random_row(coords: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if not len(coords):
        raise ValueError("no annotated voxel to place a patch on")
    return coords[int(rng.integers(len(coords)))]


class UniformSampler:
    """Patch starts drawn uniformly over the volume, or over the windows that overlap the
    annotated voxels of a partially annotated case (see the module docstring)."""

    needs_labels = False

    def start(
        self,
        shape: Shape3,
        patch: Shape3,
        rng: np.random.Generator,
        locations: Mapping[int, np.ndarray] | None = None,
        annotated: np.ndarray | None = None,
    ) -> Shape3:
        """``annotated``: ``(N, 3)`` coordinates of the annotated voxels, None where all are annotated."""
        return uniform_start(shape, patch, rng) if annotated is None else overlapping_start(shape, patch, annotated, rng)

    def __repr__(self) -> str:
        return "UniformSampler()"


class LabelSampler:
    """Oversample foreground: with probability ``foreground_ratio`` centre the patch on a
    voxel of a foreground class (picked uniformly among ``classes`` present in the case),
    otherwise sample uniformly. A case without foreground is sampled uniformly. On a
    partially annotated case, "uniformly" is: centred on a random annotated voxel.

    Args:
        foreground_ratio: probability in [0, 1] of a foreground-centred patch
            (nnU-Net uses 0.33).
        classes: label values counted as foreground (default: every value > 0).
    """

    needs_labels = True

    def __init__(self, foreground_ratio: float = 0.33, classes: Sequence[int] | None = None):
        if not 0.0 <= foreground_ratio <= 1.0:
            raise ValueError(f"foreground_ratio must lie in [0, 1], got {foreground_ratio}")
        self.foreground_ratio = float(foreground_ratio)
        self.classes = None if classes is None else tuple(int(c) for c in classes)

    def start(
        self,
        shape: Shape3,
        patch: Shape3,
        rng: np.random.Generator,
        locations: Mapping[int, np.ndarray] | None = None,
        annotated: np.ndarray | None = None,
    ) -> Shape3:
        """``locations`` maps class -> ``(N, 3)`` voxel coordinates ``(z, y, x)`` of that class (its
        annotated voxels); ``annotated``: ``(N, 3)`` of all annotated voxels, None where all are."""
        present = [c for c, coords in (locations or {}).items() if len(coords) and (self.classes is None or c in self.classes)]
        if not present or rng.random() >= self.foreground_ratio:
            if annotated is None:
                return uniform_start(shape, patch, rng)
            return centred_start(_random_row(annotated, rng), shape, patch)
        coords = locations[present[int(rng.integers(len(present)))]]
        return centred_start(_random_row(coords, rng), shape, patch)

    def __repr__(self) -> str:
        return f"LabelSampler(foreground_ratio={self.foreground_ratio}, classes={self.classes})"


def grid_windows(shape: Sequence[int], patch: Sequence[int], overlap: float | Sequence[float] = 0.5) -> list[Shape3]:
    """Window starts that tile a volume with the given fractional overlap.

    The last window along each axis is aligned to the volume's end, so every voxel
    is covered and no window reaches past the volume unless the volume is shorter
    than the patch (then one centred, padded window covers that axis).

    Args:
        shape: volume ``(Z, Y, X)`` in voxels.
        patch: window ``(Z, Y, X)`` in voxels.
        overlap: fraction in [0, 1) of the patch shared by neighbours, per axis or one value.

    Returns:
        Starts ``(z, y, x)`` in C order (x fastest).
    """
    overlaps = _triple(overlap)
    if any(not 0 <= o < 1 for o in overlaps):
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    per_axis = []
    for length, size, ov in zip(shape, patch, overlaps):
        if length <= size:
            per_axis.append([-((size - length) // 2)])
            continue
        step = max(1, int(size * (1 - ov)))
        count = math.ceil((length - size) / step) + 1
        starts = [min(i * step, length - size) for i in range(count)]
        per_axis.append(sorted(set(starts)))
    return [(z, y, x) for z in per_axis[0] for y in per_axis[1] for x in per_axis[2]]
