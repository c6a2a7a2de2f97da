"""Volumes: an image array of shape ``(C, Z, Y, X)`` plus the affine that places it in space.

Conventions (used everywhere in spadkit):

* Array axes are ``(C, Z, Y, X)``: channels first, then the slowest spatial axis.
  A 2D image is a volume with ``Z == 1``.
* The 4x4 ``affine`` maps a voxel index written ``(x, y, z, 1)`` - the array's
  spatial axes in *reverse* order, as in NIfTI/nibabel - to world coordinates in
  millimetres in RAS+ (x to the Right, y to the Anterior, z to the Superior).
  Reading a NIfTI file therefore keeps its affine unchanged; DICOM and NRRD
  (LPS+) are converted on read.
* ``spacing`` is given per *array* axis, ``(Z, Y, X)`` in mm; ``origin`` is a
  world point ``(x, y, z)`` in mm; ``orientation`` is the nibabel axis-code
  string of the voxel axes ``(x, y, z)``, e.g. ``"RAS"`` or ``"LPS"``.

The array may be a NumPy array, a Dask array or a Zarr array; nothing is read
from disk until :meth:`Volume.numpy` (or a slice of ``array``) asks for it.

Interop: MONAI indexes an affine in *array* order (``MetaTensor`` of shape
``(C, Z, Y, X)`` wants the column of array axis 1 first), TorchIO in NIfTI order
with a ``(C, X, Y, Z)`` tensor. :func:`array_order_affine` converts between
spadkit's affine and MONAI's; :meth:`Volume.to_metatensor` and
:meth:`Volume.to_torchio` build those objects directly.
"""

from __future__ import annotations

import base64
import html
import io as _io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from nibabel.orientations import (
    aff2axcodes,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from spadkit.errors import GeometryMismatchError, InvalidImageError
from spadkit.stats import count_where

#: Canonical orientation of stored volumes (voxel axes x, y, z point R, A, S).
CANONICAL_AXCODES: tuple[str, str, str] = ("R", "A", "S")

#: Affines of an image and its label map may differ by this much (mm) and still match.
AFFINE_ATOL_MM = 1e-3

#: Most channels a volume may have; more look like a time series, not an image.
MAX_CHANNELS = 8


def validate_affine(affine: np.ndarray, source: str | None = None) -> np.ndarray:
    """Check a 4x4 voxel-to-world affine and return it as float64.

    Raises:
        InvalidImageError: wrong shape, non-finite values, or a zero-length or
            degenerate voxel axis (zero or negative spacing).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InvalidImageError(f"affine must be 4x4, got {affine.shape}", path=source, fix="pass a 4x4 voxel-to-world matrix.")
    if not np.all(np.isfinite(affine)):
        raise InvalidImageError("affine contains NaN or Inf", path=source, fix="repair the header's orientation/spacing fields.")
    spacing_xyz = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing_xyz <= 1e-6) or abs(np.linalg.det(affine[:3, :3])) <= 1e-12:
        raise InvalidImageError(
            f"voxel spacing must be positive, got {tuple(np.round(spacing_xyz[::-1], 6))} mm (z, y, x)",
            path=source,
            fix="the header's pixel spacing / slice thickness is zero or the axes are degenerate; "
            "set the true spacing (e.g. with nibabel: img.header.set_zooms) before loading.",
        )
    return affine


def array_order_affine(affine: Any) -> Any:
    """Convert an affine between spadkit's voxel order ``(x, y, z)`` and array order ``(Z, Y, X)``.

    spadkit's affine (as nibabel's) multiplies ``(x, y, z, 1)``, the array's
    spatial axes reversed. MONAI's ``MetaTensor`` and its ``Spacing`` /
    ``Orientation`` transforms expect the affine of the array as indexed,
    ``(Z, Y, X, 1)`` for a ``(C, Z, Y, X)`` tensor: the first three columns are
    reversed. The conversion is its own inverse.

    Args:
        affine: NumPy array or torch tensor of shape ``(4, 4)`` or a batch ``(..., 4, 4)``.

    Returns:
        The same type and shape, with columns ``(2, 1, 0, 3)``; world coordinates stay RAS mm.
    """
    return affine[..., [2, 1, 0, 3]]


def affine_from_spacing(
    spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """RAS affine of an axis-aligned grid.

    Args:
        spacing: voxel size ``(Z, Y, X)`` in mm.
        origin: world position ``(x, y, z)`` in mm of voxel ``(0, 0, 0)``.
    """
    sz, sy, sx = (float(s) for s in spacing)
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = origin
    return affine


def as_czyx(array: Any, source: str | None = None) -> Any:
    """Return ``array`` with shape ``(C, Z, Y, X)``: a 3D array gains a channel axis.

    Raises:
        InvalidImageError: the array is not 3D or 4D, or has too many channels.
    """
    if array.ndim == 3:
        return array[None]
    if array.ndim != 4:
        raise InvalidImageError(
            f"expected a 3D (Z, Y, X) or 4D (C, Z, Y, X) array, got {array.ndim}D with shape {tuple(array.shape)}",
            path=source,
            fix="pass a volume; a 2D image is a single slice (1, Y, X).",
        )
    if array.shape[0] > MAX_CHANNELS:
        raise InvalidImageError(
            f"{array.shape[0]} channels (shape {tuple(array.shape)}) looks like a time series, not an image",
            path=source,
            fix=f"spadkit takes at most {MAX_CHANNELS} channels; split the series into 3D volumes first.",
        )
    return array


class Volume:
    """An image of shape ``(C, Z, Y, X)`` placed in RAS world space by a 4x4 affine.

    Args:
        array: NumPy, Dask or Zarr array, shape ``(C, Z, Y, X)`` or ``(Z, Y, X)``.
        affine: voxel ``(x, y, z, 1)`` -> world RAS mm; identity (1 mm) if omitted.
        modality: DICOM-style modality code (``"CT"``, ``"MR"``, ``"PT"``, ``"XR"``, ...) or None.
        meta: free-form provenance, e.g. ``{"source": "/data/ct.nii.gz"}``.
    """

    def __init__(
        self,
        array: Any,
        affine: np.ndarray | None = None,
        *,
        modality: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ):
        self.meta: dict[str, Any] = dict(meta or {})
        self.array = as_czyx(array, self.source)
        self.affine = validate_affine(np.eye(4) if affine is None else affine, self.source)
        self.modality = modality

    @classmethod
    def from_spacing(
        cls,
        array: Any,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        origin: Sequence[float] = (0.0, 0.0, 0.0),
        **kwargs: Any,
    ) -> Volume:
        """Volume on an axis-aligned RAS grid with ``spacing`` ``(Z, Y, X)`` mm."""
        return cls(array, affine_from_spacing(spacing, origin), **kwargs)

    # ------------------------------------------------------------------ geometry
    @property
    def source(self) -> str | None:
        """The file this volume was read from, if any."""
        return self.meta.get("source")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """``(Z, Y, X)`` in voxels."""
        return self.shape[1:]  # type: ignore[return-value]

    @property
    def num_channels(self) -> int:
        return self.shape[0]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(Z, Y, X)`` in mm."""
        sx, sy, sz = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(sz), float(sy), float(sx))

    @property
    def origin(self) -> tuple[float, float, float]:
        """World position ``(x, y, z)`` in mm (RAS) of the centre of voxel ``(0, 0, 0)``."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit world (RAS) directions of voxel axes x, y, z."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def orientation(self) -> str:
        """Axis codes of voxel axes ``(x, y, z)``, e.g. ``"RAS"``, ``"LPS"``."""
        return "".join(aff2axcodes(self.affine))

    @property
    def is_2d(self) -> bool:
        """True for a single-slice image (its depth is then treated as infinitely coarse)."""
        return self.spatial_shape[0] == 1

    @property
    def is_lazy(self) -> bool:
        """True when the voxels are still on disk (Dask or Zarr array)."""
        return not isinstance(self.array, np.ndarray)

    def shares_grid(self, other: Volume) -> bool:
        """True when ``other`` has the same spatial shape and affine (within :data:`AFFINE_ATOL_MM`)."""
        return self.spatial_shape == other.spatial_shape and np.allclose(self.affine, other.affine, atol=AFFINE_ATOL_MM)

    def numpy(self) -> np.ndarray:
        """The voxels as an in-memory NumPy array ``(C, Z, Y, X)``."""
        array = self.array
        if hasattr(array, "compute"):
            return np.asarray(array.compute())
        return np.asarray(array[...])

    def load(self) -> Volume:
        """This volume with its voxels read into memory."""
        return self._replace(self.numpy())

    def _replace(self, array: Any, affine: np.ndarray | None = None) -> Volume:
        """A copy with another array/affine and the same modality and metadata."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.meta = dict(self.meta)
        clone.array = as_czyx(array, self.source)
        clone.affine = self.affine if affine is None else validate_affine(affine, self.source)
        return clone

    # ------------------------------------------------------------------ reorientation
    def reoriented(self, axcodes: Sequence[str] = CANONICAL_AXCODES) -> Volume:
        """The same image with voxel axes ``(x, y, z)`` pointing along ``axcodes``.

        Only flips and axis permutations are applied (no resampling), so voxel
        values are unchanged; the original affine is kept in
        ``meta["original_affine"]``. Lazy arrays stay lazy (Zarr becomes Dask).
        """
        current = io_orientation(self.affine)
        transform = ornt_transform(current, axcodes2ornt(tuple(axcodes)))
        if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
            return self
        array = self.array
        if not isinstance(array, np.ndarray) and not hasattr(array, "compute"):
            import dask.array as da

            array = da.from_array(array, chunks=array.chunks if hasattr(array, "chunks") else "auto")
        shape_xyz = self.spatial_shape[::-1]
        # voxel axis i (x, y, z) is array axis 3 - i; flip first, then permute.
        for voxel_axis, (_, flip) in enumerate(transform):
            if flip == -1:
                array = np.flip(array, axis=3 - voxel_axis)
        new_voxel_axis_of = [int(t) for t in transform[:, 0]]
        order = [0] + [3 - new_voxel_axis_of.index(3 - out_axis) for out_axis in (1, 2, 3)]
        array = array.transpose(order)
        affine = self.affine @ inv_ornt_aff(transform, shape_xyz)
        out = self._replace(array, affine)
        out.meta.setdefault("original_affine", self.affine.tolist())
        return out

    def canonical(self) -> Volume:
        """Reoriented to RAS (spadkit's storage orientation)."""
        return self.reoriented(CANONICAL_AXCODES)

    # ------------------------------------------------------------------ interop
    def to_metatensor(self) -> Any:
        """This volume as a MONAI ``MetaTensor`` ``(C, Z, Y, X)`` with its affine in array order.

        The voxels are read into memory. ``pixdim`` is then ``spacing`` ``(Z, Y, X)``,
        and MONAI's ``Spacing``/``Orientation`` transforms place the voxels as spadkit
        does (world RAS mm). Requires ``monai`` (the ``bench`` extra).
        """
        import torch
        from monai.data import MetaTensor

        meta = {"filename_or_obj": self.source or "", "space": "RAS", "modality": self.modality}
        affine = torch.as_tensor(array_order_affine(self.affine), dtype=torch.float64)
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(self.numpy())), affine=affine, meta=meta)

    def to_torchio(self, label: bool = False) -> Any:
        """This volume as a TorchIO ``ScalarImage`` (``LabelMap`` with ``label=True``).

        TorchIO keeps NIfTI's order: the tensor is ``(C, X, Y, Z)`` (a transposed
        view of the voxels, read into memory) and the affine is spadkit's, unchanged.
        Requires ``torchio`` (the ``bench`` extra).
        """
        import torch
        import torchio

        kind = torchio.LabelMap if label else torchio.ScalarImage
        tensor = torch.from_numpy(np.ascontiguousarray(self.numpy().transpose(0, 3, 2, 1)))
        return kind(tensor=tensor, affine=self.affine.copy())

    @classmethod
    def from_metatensor(cls, tensor: Any, **kwargs: Any) -> Volume:
        """A volume from a MONAI ``MetaTensor`` ``(C, Z, Y, X)`` (e.g. after ``Spacing``); inverse of :meth:`to_metatensor`."""
        affine = array_order_affine(np.asarray(tensor.affine.detach().cpu(), dtype=np.float64))
        return cls(tensor.detach().cpu().numpy(), affine, **kwargs)

    @classmethod
    def from_torchio(cls, image: Any, **kwargs: Any) -> Volume:
        """A volume from a TorchIO image ``(C, X, Y, Z)``; inverse of :meth:`to_torchio`."""
        return cls(image.data.numpy().transpose(0, 3, 2, 1), image.affine, **kwargs)

    # ------------------------------------------------------------------ display
    def _summary(self) -> dict[str, str]:
        sz, sy, sx = self.spacing
        return {
            "shape (C, Z, Y, X)": str(self.shape),
            "spacing (Z, Y, X) mm": f"({sz:.4g}, {sy:.4g}, {sx:.4g})",
            "origin (x, y, z) mm": "(" + ", ".join(f"{v:.4g}" for v in self.origin) + ")",
            "orientation": self.orientation,
            "dtype": str(self.dtype),
            "modality": self.modality or "unknown",
            "storage": type(self.array).__module__.split(".")[0] + (" (lazy)" if self.is_lazy else ""),
            "source": str(self.source or "-"),
        }

    def __repr__(self) -> str:
        fields = ", ".join(f"{k.split(' ')[0]}={v}" for k, v in self._summary().items() if k != "storage")
        return f"{type(self).__name__}({fields})"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in self._summary().items()
        )
        thumb = ""
        if not self.is_lazy:
            thumb = f"<td style='vertical-align:top'><img src='data:image/png;base64,{self._thumbnail_png()}'/></td>"
        return f"<table><tr><td><b>{type(self).__name__}</b><table>{rows}</table></td>{thumb}</tr></table>"

    def _thumbnail_png(self, size: int = 160) -> str:
        """Middle slice of channel 0 as a base64 PNG, windowed to the 1-99 percentiles."""
        from PIL import Image

        plane = np.asarray(self.array[0, self.spatial_shape[0] // 2], dtype=np.float32)
        lo, hi = np.percentile(plane, [1, 99]) if plane.size else (0.0, 1.0)
        scaled = np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1)
        image = Image.fromarray((scaled * 255).astype(np.uint8)[::-1])  # world-up at the top
        image.thumbnail((size, size))
        buffer = _io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")


class LabelVolume(Volume):
    """An integer label map ``(1, Z, Y, X)`` on the same grid as its image.

    Args:
        array: integer (or integer-valued float) array ``(Z, Y, X)`` or ``(1, Z, Y, X)``.
        affine: as for :class:`Volume`.
        classes: label value -> class name, e.g. ``{0: "background", 1: "spleen"}``.
        meta: provenance.
    """

    def __init__(
        self,
        array: Any,
        affine: np.ndarray | None = None,
        *,
        classes: Mapping[int, str] | None = None,
        meta: Mapping[str, Any] | None = None,
    ):
        super().__init__(array, affine, modality="label", meta=meta)
        if self.num_channels != 1:
            raise InvalidImageError(
                f"a label map has one channel, got shape {self.shape}",
                path=self.source,
                fix="store one-hot or multi-channel labels as one integer map.",
            )
        self.array = _as_integer_labels(self.array, self.source)
        self.classes: dict[int, str] = {int(k): str(v) for k, v in (classes or {}).items()}

    def check_matches(self, image: Volume) -> None:
        """Raise unless this label map shares ``image``'s spatial shape and affine.

        Raises:
            GeometryMismatchError: naming both files and the difference.
        """
        where = f"label {self.source or '(in memory)'} vs image {image.source or '(in memory)'}"
        if self.spatial_shape != image.spatial_shape:
            raise GeometryMismatchError(
                f"{where}: shape (Z, Y, X) {self.spatial_shape} differs from the image's {image.spatial_shape}",
                path=self.source,
                fix="the label map must be drawn on the image's own grid; resample it onto the image first.",
            )
        if not np.allclose(self.affine, image.affine, atol=AFFINE_ATOL_MM):
            diff = float(np.max(np.abs(self.affine - image.affine)))
            raise GeometryMismatchError(
                f"{where}: affine differs from the image's by up to {diff:.4g} mm "
                f"(label spacing {np.round(self.spacing, 4)}, image spacing {np.round(image.spacing, 4)}, "
                f"label orientation {self.orientation}, image {image.orientation})",
                path=self.source,
                fix="check that the label belongs to this image; if it does, copy the image's affine into the label file.",
            )


def _as_integer_labels(array: Any, source: str | None) -> Any:
    """Cast a label array to an integer dtype; float labels must hold whole numbers."""
    dtype = np.dtype(array.dtype)
    if dtype == np.bool_:
        return array.astype(np.uint8)
    if np.issubdtype(dtype, np.integer):
        return array
    if not np.issubdtype(dtype, np.floating):
        raise InvalidImageError(f"label dtype {dtype} is not numeric", path=source, fix="save labels as integers.")
    # Float labels are common (NIfTI written as float32): every voxel is checked,
    # a lazy array slab by slab so that it is never decoded whole.
    if count_where(array, _not_a_class_number, source):
        raise InvalidImageError(
            "label map holds non-integer or non-finite values",
            path=source,
            fix="labels must be whole class numbers; was an image passed as a label?",
        )
    return array.astype(np.int32)


def _not_a_class_number(values: np.ndarray) -> np.ndarray:
    """True where a float label voxel is NaN/Inf or not a whole number."""
    return ~np.isfinite(values) | (values != np.round(values))
