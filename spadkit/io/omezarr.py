"""spadkit's OME-Zarr store: one NGFF 0.5 (Zarr v3) multiscale image per case, labels with versions.

Layout of a store (a local folder or an fsspec URL such as ``s3://bucket/ds.zarr``)::

    STORE.zarr/
      zarr.json                 root group; attrs["spadkit"]: dataset, catalog entry, fingerprint
      <case_id>/                NGFF multiscale image, axes (c, z, y, x), scale in mm
        0/ 1/ 2/                resolution levels (spacing-aware: a coarse z is not halved)
        labels/
          seg/                  NGFF image-label; its `datasets` point at the latest version
            v0001/0 v0001/1     every saved edit is a new version (time, author, message)
            v0002/0 ...

Each case group carries ``attrs["spadkit"]`` with the full RAS affine, the
original (pre-reorientation) affine, modality, intensity statistics and
``complete: true``, which is written *last*: a case without it was interrupted
and is ignored by readers and redone by ``spadkit ingest``.

Volumes are stored in canonical RAS orientation; NGFF has no orientation or
rotation field, so ``coordinateTransformations`` hold the spacing and the
origin and viewers (napari-ome-zarr) show the right physical scale.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from nibabel.orientations import aff2axcodes
from ome_zarr.format import FormatV05
from ome_zarr.writer import write_multiscales_metadata
from zarr.codecs import BloscCodec

from spadkit.errors import StoreError
from spadkit.volume import LabelVolume, Volume

#: Version of spadkit's own attributes inside the store.
STORE_FORMAT = 1
NGFF = FormatV05()

#: Chunk edge (voxels) for the finest axis; coarser axes get proportionally fewer voxels
#: so that a chunk spans a similar physical extent (see benchmarks/chunking.py).
CHUNK_EDGE = 64
#: Smallest chunk edge along any axis.
MIN_CHUNK_EDGE = 16
#: Fastest compressed codec for random patch reads (benchmarks/chunking.py: 64^3 lz4
#: ~4-5 ms per 96^3 patch vs ~6 ms zstd, ~20 ms with 32^3 chunks). Sharding (one shard
#: per level) cuts a volume's files from hundreds to one but costs ~1.5-2 ms per patch:
#: it is opt-in (``OMEZarrStore(..., sharded=True)``) for object storage and huge collections.
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
#: Stop adding pyramid levels once the largest in-plane size is at most this.
MIN_LEVEL_SIZE = 64
MAX_LEVELS = 5

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED = {"labels", "zarr.json"}
_AXES = [
    {"name": "c", "type": "channel"},
    {"name": "z", "type": "space", "unit": "millimeter"},
    {"name": "y", "type": "space", "unit": "millimeter"},
    {"name": "x", "type": "space", "unit": "millimeter"},
]


def now_iso() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def chunk_shape(spatial_shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, int, int, int]:
    """Chunk shape ``(1, cz, cy, cx)`` for random 3D patch reads.

    The finest axis gets :data:`CHUNK_EDGE` voxels; an axis ``k`` times coarser
    gets the power of two nearest ``CHUNK_EDGE / k`` (at least
    :data:`MIN_CHUNK_EDGE`), so a chunk covers a roughly cubic physical extent.
    No chunk edge exceeds the array. A 2D image gets ``(1, 1, 256, 256)`` tiles.
    """
    if spatial_shape[0] == 1:
        return (1, 1, min(256, spatial_shape[1]), min(256, spatial_shape[2]))
    finest = min(spacing)
    edges = []
    for size, space in zip(spatial_shape, spacing):
        ideal = CHUNK_EDGE * finest / space
        edge = max(MIN_CHUNK_EDGE, 2 ** round(math.log2(ideal)))
        edges.append(int(min(edge, size)))
    return (1, *edges)


def pyramid_factors(spatial_shape: Sequence[int], spacing: Sequence[float]) -> list[tuple[int, int, int]]:
    """Per-level down-sampling factors ``(fz, fy, fx)`` relative to level 0.

    Each level halves the axes that are clearly finer than the coarsest one
    (spacing below ``coarsest / sqrt(2)``), or all axes once the grid is about
    isotropic, so that an anisotropic 1x1x3 mm volume first becomes isotropic
    instead of squashing its few slices. A size-1 axis is never halved.
    """
    factors = [(1, 1, 1)]
    shape = np.asarray(spatial_shape, dtype=float)
    space = np.asarray(spacing, dtype=float)
    while len(factors) < MAX_LEVELS and shape[1:].max() > MIN_LEVEL_SIZE:
        can = shape >= 2 * MIN_CHUNK_EDGE
        fine = can & (space * math.sqrt(2) < space[can].max(initial=0))
        halve = fine if fine.any() else can
        if not halve.any():
            break
        shape = np.where(halve, np.floor(shape / 2), shape)
        space = np.where(halve, space * 2, space)
        factors.append(tuple(int(f * (2 if h else 1)) for f, h in zip(factors[-1], halve)))
    return factors


def _downsample(array: np.ndarray, factor: Sequence[int], *, label: bool) -> np.ndarray:
    """Down-sample ``(C, Z, Y, X)`` by integer ``factor`` (Z, Y, X).

    Trailing voxels that do not fill a block are dropped; images take the block
    mean, labels the block's first voxel (nearest neighbour, no new values).
    """
    fz, fy, fx = factor
    c, z, y, x = array.shape
    cropped = array[:, : z // fz * fz, : y // fy * fy, : x // fx * fx]
    if label:
        return cropped[:, ::fz, ::fy, ::fx]
    blocks = cropped.reshape(c, z // fz, fz, y // fy, fy, x // fx, fx)
    mean = blocks.mean(axis=(2, 4, 6), dtype=np.float32)
    return mean.astype(array.dtype) if np.issubdtype(array.dtype, np.floating) else np.rint(mean).astype(array.dtype)


def _datasets(prefix: str, factors: Sequence[Sequence[int]], spacing: Sequence[float], origin_zyx: Sequence[float]) -> list[dict]:
    """NGFF ``datasets`` entries: scale in mm and the world position of each level's first voxel centre."""
    out = []
    for level, factor in enumerate(factors):
        scale = [float(s * f) for s, f in zip(spacing, factor)]
        shift = [float(o + (f - 1) * s / 2) for o, f, s in zip(origin_zyx, factor, spacing)]
        out.append(
            {
                "path": f"{prefix}{level}",
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, *scale]},
                    {"type": "translation", "translation": [0.0, *shift]},
                ],
            }
        )
    return out


def _write_levels(
    group: zarr.Group,
    prefix: str,
    data: np.ndarray,
    factors: Sequence[Sequence[int]],
    spacing: Sequence[float],
    *,
    label: bool,
    sharded: bool,
) -> None:
    """Write ``data`` ``(C, Z, Y, X)`` and its down-sampled levels as arrays ``{prefix}{level}``."""
    chunks = chunk_shape(data.shape[1:], spacing)
    for level, factor in enumerate(factors):
        level_data = data if level == 0 else _downsample(data, factor, label=label)
        level_chunks = tuple(min(c, s) for c, s in zip(chunks, level_data.shape))
        shards = tuple(math.ceil(s / c) * c for s, c in zip(level_data.shape, level_chunks)) if sharded else None
        array = group.create_array(
            f"{prefix}{level}",
            shape=level_data.shape,
            dtype=level_data.dtype,
            chunks=level_chunks,
            shards=shards,
            compressors=[COMPRESSOR],
            dimension_names=("c", "z", "y", "x"),
            fill_value=0,
            overwrite=True,
            # Every chunk is written, even all-fill ones: a chunk file missing later
            # then means the store lost data (readers check), not "all background".
            config={"write_empty_chunks": True},
        )
        array[...] = level_data


class OMEZarrStore:
    """A collection of cases in one OME-Zarr hierarchy (see the module docstring).

    Args:
        url: local path or fsspec URL of the store.
        mode: ``"r"`` (read only, must exist), ``"a"`` (read/write, create if missing).
        storage_options: passed to fsspec for remote URLs.
        sharded: when creating the store, pack each array level into one shard file
            (fewer files, slightly slower patch reads); recorded in the store.
    """

    def __init__(self, url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None, *, sharded: bool = False):
        self.url = str(url)
        self.mode = mode
        self._storage_options = dict(storage_options or {})
        try:
            self.root = zarr.open_group(self.url, mode=mode, storage_options=self._storage_options or None, zarr_format=3)
        except FileNotFoundError:
            raise StoreError("no OME-Zarr store here", path=self.url, fix="create it with `spadkit ingest ... --out STORE.zarr`.") from None
        if mode != "r" and "spadkit" not in self.root.attrs:
            self.root.attrs["spadkit"] = {"store_format": STORE_FORMAT, "created": now_iso(), "sharded": sharded}
        info = self.root.attrs.get("spadkit")
        if not isinstance(info, dict):
            raise StoreError("this Zarr group was not written by spadkit", path=self.url, fix="ingest the data with `spadkit ingest`.")
        if int(info.get("store_format", 0)) > STORE_FORMAT:
            raise StoreError(f"store format {info['store_format']} is newer than this spadkit ({STORE_FORMAT})", path=self.url, fix="upgrade spadkit.")

    # ------------------------------------------------------------------ store level
    @property
    def info(self) -> dict[str, Any]:
        """The store's own attributes (dataset name, catalog entry, ...)."""
        return dict(self.root.attrs["spadkit"])

    @property
    def sharded(self) -> bool:
        return bool(self.root.attrs["spadkit"].get("sharded", False))

    def update_info(self, **values: Any) -> None:
        self.root.attrs["spadkit"] = {**self.info, **values}

    def cases(self) -> list[str]:
        """Ids of the complete cases, sorted."""
        return sorted(name for name, group in self.root.groups() if self._is_complete(group))

    def incomplete_cases(self) -> list[str]:
        """Ids of case groups an interrupted write left behind."""
        return sorted(name for name, group in self.root.groups() if not self._is_complete(group))

    def __contains__(self, case_id: str) -> bool:
        return case_id in self.root and self._is_complete(self.root[case_id])

    def __len__(self) -> int:
        return len(self.cases())

    @staticmethod
    def _is_complete(group: zarr.Group) -> bool:
        return bool(group.attrs.get("spadkit", {}).get("complete"))

    # ------------------------------------------------------------------ cases
    def _case(self, case_id: str) -> zarr.Group:
        if case_id not in self:
            raise StoreError(f"no complete case {case_id!r}", path=self.url, fix=f"available: {', '.join(self.cases()[:10]) or 'none'}.")
        return self.root[case_id]

    def remove_case(self, case_id: str) -> None:
        """Delete a case (used to clear an interrupted write before redoing it)."""
        if case_id in self.root:
            del self.root[case_id]

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        return dict(self._case(case_id).attrs["spadkit"])

    def write_case(
        self,
        case_id: str,
        image: Volume,
        label: LabelVolume | None = None,
        *,
        attrs: Mapping[str, Any] | None = None,
        author: str | None = None,
    ) -> None:
        """Write one case: the image pyramid, the label (as version 1) and, last, the completion marker.

        Args:
            case_id: letters, digits, ``_ . -``; not ``labels``.
            image: the image, already in the orientation to store (ingest passes RAS).
            label: optional label map on the image's grid.
            attrs: extra case attributes (intensity statistics, source files, ...).
            author: recorded with the label version (default: the OS user).
        """
        if not _CASE_ID.match(case_id) or case_id in _RESERVED:
            raise StoreError(f"invalid case id {case_id!r}", path=self.url, fix="use letters, digits, '_', '.', '-' and start with a letter or digit.")
        if label is not None:
            label.check_matches(image)
        self.remove_case(case_id)
        group = self.root.create_group(case_id)
        data = image.numpy()
        factors = pyramid_factors(image.spatial_shape, image.spacing)
        _write_levels(group, "", data, factors, image.spacing, label=False, sharded=self.sharded)
        origin_zyx = image.origin[::-1]
        write_multiscales_metadata(group, _datasets("", factors, image.spacing, origin_zyx), fmt=NGFF, axes=_AXES, name=case_id)
        if label is not None:
            self._write_label_version(group, "seg", label, author=author, message="ingested", factors=factors)
        original_affine = np.asarray(image.meta.get("original_affine", image.affine))
        group.attrs["spadkit"] = {
            **dict(attrs or {}),
            "affine": image.affine.tolist(),
            "original_affine": original_affine.tolist(),
            "original_orientation": "".join(aff2axcodes(original_affine)),
            "modality": image.modality,
            "spacing_zyx_mm": list(image.spacing),
            "shape_czyx": list(image.shape),
            "pyramid_factors_zyx": [list(f) for f in factors],
            "all_chunks_written": True,
            "written": now_iso(),
            "complete": True,
        }

    def read_image(self, case_id: str, level: int = 0) -> Volume:
        """The case's image at a pyramid level as a lazy :class:`Volume` (Zarr-backed)."""
        group = self._case(case_id)
        attrs = group.attrs["spadkit"]
        array = self._level_array(group, "", level, len(attrs["pyramid_factors_zyx"]))
        affine = _level_affine(np.asarray(attrs["affine"]), attrs["pyramid_factors_zyx"][level])
        return Volume(array, affine, modality=attrs.get("modality"), meta={"source": f"{self.url}/{case_id}", "case_id": case_id, "format": "ome-zarr"})

    def _level_array(self, group: zarr.Group, prefix: str, level: int, num_levels: int) -> zarr.Array:
        if not 0 <= level < num_levels:
            raise StoreError(f"level {level} out of range 0..{num_levels - 1}", path=f"{self.url}/{group.path}", fix="pick an existing pyramid level.")
        return group[f"{prefix}{level}"]

    # ------------------------------------------------------------------ labels and versions
    def label_names(self, case_id: str) -> list[str]:
        group = self._case(case_id)
        if "labels" not in group:
            return []
        return list(group["labels"].attrs.get("ome", {}).get("labels", []))

    def label_versions(self, case_id: str, name: str = "seg") -> list[dict[str, Any]]:
        """Saved versions of a label map, oldest first: ``{version, path, time, author, message}``."""
        return list(self._label_group(case_id, name).attrs["spadkit"]["versions"])

    def read_label(self, case_id: str, name: str = "seg", version: int | None = None, level: int = 0) -> LabelVolume:
        """A label map; the latest version unless ``version`` is given."""
        group = self._label_group(case_id, name)
        versions = group.attrs["spadkit"]["versions"]
        chosen = versions[-1] if version is None else next((v for v in versions if v["version"] == version), None)
        if chosen is None:
            raise StoreError(f"label {name!r} of {case_id} has no version {version}", path=self.url, fix=f"versions: {[v['version'] for v in versions]}.")
        attrs = self.case_attrs(case_id)
        array = self._level_array(group, f"{chosen['path']}/", level, len(attrs["pyramid_factors_zyx"]))
        affine = _level_affine(np.asarray(attrs["affine"]), attrs["pyramid_factors_zyx"][level])
        classes = {int(k): v for k, v in group.attrs["spadkit"].get("classes", {}).items()}
        meta = {"source": f"{self.url}/{case_id}/labels/{name}", "case_id": case_id, "version": chosen["version"]}
        return LabelVolume(array, affine, classes=classes, meta=meta)

    def save_label(self, case_id: str, label: LabelVolume, name: str = "seg", *, author: str | None = None, message: str = "") -> int:
        """Save ``label`` as a new version (it becomes the default); return its number.

        The arrays are written under a new version folder first; the label's
        metadata, which points readers at the latest version, is replaced in a
        single write afterwards, so an interruption leaves the previous version
        in place and the store consistent.
        """
        group = self._case(case_id)
        label.check_matches(self.read_image(case_id))
        return self._write_label_version(group, name, label, author=author, message=message)

    def _label_group(self, case_id: str, name: str) -> zarr.Group:
        group = self._case(case_id)
        if "labels" not in group or name not in group["labels"]:
            raise StoreError(f"case {case_id} has no label {name!r}", path=self.url, fix=f"labels present: {self.label_names(case_id) or 'none'}.")
        return group["labels"][name]

    def _write_label_version(
        self,
        case_group: zarr.Group,
        name: str,
        label: LabelVolume,
        *,
        author: str | None,
        message: str,
        factors: Sequence[Sequence[int]] | None = None,
    ) -> int:
        labels = case_group.require_group("labels")
        existing = list(labels.attrs.get("ome", {}).get("labels", []))
        if name not in existing:
            labels.attrs["ome"] = {"version": NGFF.version, "labels": [*existing, name]}
        group = labels.require_group(name)
        previous = dict(group.attrs.get("spadkit", {}))
        versions = list(previous.get("versions", []))
        classes = label.classes or {int(k): v for k, v in previous.get("classes", {}).items()}  # an edit keeps the names
        number = versions[-1]["version"] + 1 if versions else 1
        prefix = f"v{number:04d}/"
        if prefix[:-1] in group:  # left by an interrupted save: never referenced, safe to replace
            del group[prefix[:-1]]
        if factors is None:
            factors = case_group.attrs["spadkit"]["pyramid_factors_zyx"]
        _write_levels(group, prefix, label.numpy().astype(np.int32, copy=False), factors, label.spacing, label=True, sharded=self.sharded)
        entry = {"version": number, "path": prefix[:-1], "time": now_iso(), "author": author or getpass.getuser(), "message": message}
        multiscale = {
            "name": name,
            "axes": _AXES,
            "datasets": _datasets(prefix, factors, label.spacing, label.origin[::-1]),
        }
        properties = [{"label-value": k, "name": v} for k, v in sorted(classes.items())]
        group.attrs.put(
            {
                "ome": {
                    "version": NGFF.version,
                    "multiscales": [multiscale],
                    "image-label": {"version": NGFF.version, "source": {"image": "../../"}, **({"properties": properties} if properties else {})},
                },
                "spadkit": {"versions": [*versions, entry], "classes": {str(k): v for k, v in classes.items()}},
            }
        )
        return number


def _level_affine(affine0: np.ndarray, factor_zyx: Sequence[int]) -> np.ndarray:
    """Affine of a pyramid level down-sampled by ``factor_zyx`` (its voxels are block centres)."""
    factor_xyz = np.asarray(factor_zyx[::-1], dtype=float)
    affine = affine0.copy()
    affine[:3, :3] = affine0[:3, :3] * factor_xyz
    affine[:3, 3] = affine0[:3, :3] @ ((factor_xyz - 1) / 2) + affine0[:3, 3]
    return affine
