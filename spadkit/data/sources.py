"""Datasets a :class:`~spadkit.data.PatchStream` draws from, and how they are mixed.

A *source* is one OME-Zarr store written by ``spadkit ingest`` (optionally a
subset of its cases, e.g. a training split). Indexing a source reads only case
attributes (shape, spacing, affine, intensity statistics), never voxels, so it
is cheap even for stores of many thousand cases.

Mixing decides how many *case visits* each dataset gets per epoch:

* ``"proportional"``: in proportion to its number of cases (every case once per epoch);
* ``"uniform"``: the same number of visits for every dataset;
* a float ``T`` (temperature): in proportion to ``n_cases ** (1 / T)``; ``T = 1`` is
  proportional, large ``T`` approaches uniform (as in multilingual language models).

A source's ``weight`` multiplies its share on top of that, e.g. ``weight=0.1`` to
down-weight a huge 2D X-ray collection (as PUMIT does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from spadkit.errors import StoreError
from spadkit.io.omezarr import OMEZarrStore

Mixing = Literal["proportional", "uniform"] | float


@dataclass(frozen=True)
class DatasetSource:
    """One store to draw patches from.

    Args:
        store: path or fsspec URL of an OME-Zarr store written by ``spadkit ingest``.
        name: dataset id carried by every patch (default: the store's dataset name).
        weight: multiplies the dataset's share of visits (``0`` leaves it out).
        cases: only these case ids (a split); default all complete cases.
        label: name of the label map to return with each patch (``None``: images only).
        boxes: name of the box set to return with each patch (``OMEZarrStore.save_boxes``;
            ``None``: none). Cases without that set are read without boxes. Needs a stream
            with ``joint_classes``.
        classes: name of the image-level class record to return (``OMEZarrStore.save_image_classes``),
            the same way.
        level: pyramid level to read (0 is full resolution).
        storage_options: fsspec options for a remote store (credentials, endpoint),
            e.g. ``{"anon": True}`` for a public ``s3://`` bucket.
    """

    store: str | Path
    name: str | None = None
    weight: float = 1.0
    cases: Sequence[str] | None = None
    label: str | None = None
    level: int = 0
    storage_options: dict[str, Any] | None = None
    boxes: str | None = None
    classes: str | None = None


@dataclass(frozen=True)
class CaseInfo:
    """What the stream needs to know about one case, read from its attributes.

    Shapes and spacings are those of the pyramid level that is read.
    """

    dataset: str
    store: str
    case_id: str
    shape: tuple[int, int, int, int]
    """``(C, Z, Y, X)`` in voxels."""
    spacing: tuple[float, float, float]
    """``(Z, Y, X)`` in mm."""
    affine: tuple[tuple[float, ...], ...]
    """4x4 voxel ``(x, y, z)`` to RAS mm."""
    modality: str | None
    dtype: str
    intensity: tuple[dict[str, Any], ...] = field(repr=False)
    """Per-channel statistics recorded at ingest (min, max, mean, std, p0.5, p99.5, ...)."""
    label: str | None
    level: int
    pyramid_factors: tuple[tuple[int, int, int], ...] = ()
    """Down-sampling factors ``(Z, Y, X)`` of every stored level relative to level 0."""
    storage_options: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    """fsspec options of a remote store."""
    all_chunks_written: bool = False
    """Ingest wrote every chunk, so a missing chunk file means lost data (older stores
    skipped all-zero chunks, which then read as zeros)."""
    spacing_assumed: bool = False
    """The reader assumed the pixel size (PNG/JPEG 1 mm, TIFF without resolution), so
    ``spacing`` is in voxels, not measured mm (case attrs ``spacing_assumed``)."""
    boxes: str | None = None
    """Name of the box set to read (the case may have none)."""
    classes: str | None = None
    """Name of the image-level class record to read (the case may have none)."""

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return self.shape[1:]

    @property
    def is_2d(self) -> bool:
        return self.shape[1] == 1


def _source(spec: str | Path | DatasetSource) -> DatasetSource:
    return spec if isinstance(spec, DatasetSource) else DatasetSource(store=spec)


def index_source(spec: str | Path | DatasetSource) -> list[CaseInfo]:
    """The cases of one source, in sorted case-id order.

    Raises:
        StoreError: the store has no complete case, lacks a requested case or label,
            or the level does not exist.
    """
    spec = _source(spec)
    store = OMEZarrStore(str(spec.store), storage_options=spec.storage_options)
    available = store.cases()
    wanted = list(spec.cases) if spec.cases is not None else available
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise StoreError(
            f"{len(missing)} requested case(s) are not complete in this store: {', '.join(missing[:5])}",
            path=store.url,
            fix="check the split file, or finish the ingest with `spadkit ingest` (it resumes).",
        )
    if not wanted:
        raise StoreError(
            "the store has no complete cases to draw patches from",
            path=store.url,
            fix="ingest data into it with `spadkit ingest SOURCE --out STORE`, or remove it from the sources.",
        )
    name = spec.name or store.info.get("dataset") or Path(store.url).stem
    return [_case_info(store, case_id, name, spec) for case_id in sorted(wanted)]


def _case_info(store: OMEZarrStore, case_id: str, dataset: str, spec: DatasetSource) -> CaseInfo:
    attrs = store.case_attrs(case_id)
    factors = attrs["pyramid_factors_zyx"]
    if not 0 <= spec.level < len(factors):
        raise StoreError(f"case {case_id} has no pyramid level {spec.level}", path=store.url, fix=f"use a level in 0..{len(factors) - 1}.")
    if spec.label is not None and spec.label not in store.label_names(case_id):
        raise StoreError(
            f"case {case_id} has no label {spec.label!r}",
            path=store.url,
            fix=f"labels present: {store.label_names(case_id) or 'none'}; pass label=None for images only.",
        )
    factor = factors[spec.level]
    try:
        image = store.read_image(case_id, spec.level)
    except (KeyError, FileNotFoundError) as error:  # zarr raises KeyError for a missing array
        raise StoreError(
            f"case {case_id} is marked complete but its image level {spec.level} is missing ({error!r})",
            path=store.url,
            fix="the store lost files (e.g. an interrupted copy): copy it again, or re-ingest the case with `spadkit ingest`.",
        ) from error
    array = image.array
    spacing = tuple(float(s) * f for s, f in zip(attrs["spacing_zyx_mm"], factor))
    return CaseInfo(
        dataset=dataset,
        store=store.url,
        case_id=case_id,
        shape=tuple(int(s) for s in array.shape),
        spacing=spacing,
        affine=tuple(tuple(float(v) for v in row) for row in image.affine),
        modality=attrs.get("modality"),
        dtype=str(array.dtype),
        intensity=tuple(attrs.get("intensity", ())),
        label=spec.label,
        level=spec.level,
        storage_options=spec.storage_options,
        pyramid_factors=tuple(tuple(int(f) for f in level) for level in factors),
        all_chunks_written=bool(attrs.get("all_chunks_written", False)),
        spacing_assumed=bool(attrs.get("spacing_assumed", False)),
        boxes=spec.boxes,
        classes=spec.classes,
    )


def dataset_probabilities(sizes: Sequence[int], mixing: Mixing = "proportional", weights: Sequence[float] | None = None) -> np.ndarray:
    """Share of case visits per dataset.

    Args:
        sizes: number of cases per dataset.
        mixing: ``"proportional"``, ``"uniform"`` or a temperature ``T > 0``.
        weights: per-dataset multipliers (default all 1).

    Returns:
        float64 array summing to 1.

    Raises:
        ValueError: unknown mixing, non-positive temperature, negative/NaN weights,
            or weights that leave no dataset with a positive share.
    """
    sizes_arr = np.asarray(sizes, dtype=float)
    if mixing == "proportional":
        base = sizes_arr
    elif mixing == "uniform":
        base = np.ones_like(sizes_arr)
    elif isinstance(mixing, (int, float)) and not isinstance(mixing, bool) and mixing > 0:
        base = sizes_arr ** (1.0 / float(mixing))
    else:
        raise ValueError(f"mixing must be 'proportional', 'uniform' or a temperature > 0, not {mixing!r}")
    w = np.ones_like(sizes_arr) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != sizes_arr.shape:
        raise ValueError(f"got {w.size} weights for {sizes_arr.size} datasets")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"dataset weights must be finite and >= 0, got {w.tolist()}")
    share = base * w
    if share.sum() <= 0:
        raise ValueError(
            f"dataset weights {w.tolist()} give every dataset a zero share: nothing to sample. "
            "Fix: give at least one dataset a positive weight."
        )
    return share / share.sum()


def allocate_visits(total: int, probabilities: np.ndarray) -> np.ndarray:
    """Split ``total`` visits by ``probabilities`` with largest-remainder rounding (sums to ``total``)."""
    exact = probabilities * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    if remainder:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:remainder]] += 1
    return counts
