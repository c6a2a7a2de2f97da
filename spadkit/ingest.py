"""Dask-parallel conversion of a dataset folder into a spadkit OME-Zarr store.

For every case: read the image (and label), check it (finite voxels, label on
the image's grid), reorient to RAS without resampling (the spacing is kept),
record intensity statistics, and write it to the store. Cases run as Dask tasks
on local threads by default, or on a ``dask.distributed`` cluster when an
address is given. Re-running skips finished cases; a case that was being
written when the run stopped has no completion marker and is redone.

A failing case does not stop the others: its error (which names the file and
the fix) is collected in the :class:`IngestReport`.

One run at a time writes a local store: a second run fails at once with a
message naming the lock file and its holder (:mod:`spadkit.io.lock`). A
re-run also redoes complete cases whose arrays are missing and damaged case
folders; ``repair=True`` (``spadkit ingest --repair``) additionally reads
every chunk of every complete case and redoes the cases that fail
(:func:`spadkit.check.check_case`).

Memory: a case needs about 2-3x its decoded voxel bytes (the volume itself,
chunk-wise statistics and pyramid levels, see README "Safety and limits");
the default number of local workers is what the available memory allows
(:func:`default_workers`).

At the end the store's root attributes get ``spadkit.fingerprint`` (read it with
``OMEZarrStore(url).info["fingerprint"]`` or ``spadkit info STORE.zarr``): per-case spacing and shape,
and per-modality intensity statistics, as nnU-Net's dataset fingerprint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
from dask.callbacks import Callback
from tqdm.auto import tqdm

from spadkit import __version__, stats
from spadkit.catalog import DatasetEntry
from spadkit.discovery import CaseSource, case_id_from, discover_cases
from spadkit.errors import InvalidImageError, SpadkitError, StoreError
from spadkit.io import OMEZarrStore, read_volume
from spadkit.io.lock import local_root, store_lock
from spadkit.io.omezarr import INGEST_LOCK, now_iso
from spadkit.stats import PERCENTILES
from spadkit.volume import LabelVolume, Volume

#: Peak memory of one case in units of its decoded voxel bytes (measured: benchmarks/ingest_memory.py).
CASE_MEMORY_FACTOR = 3.0
#: Cases whose headers are read to size the default worker count.
SIZE_SAMPLE = 8

@dataclass
class IngestReport:
    """What one ``ingest`` run did."""

    store: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    #: complete or damaged cases found broken and redone: ``{case_id: what was wrong}``
    repaired: dict[str, str] = field(default_factory=dict)
    #: broken cases of the store that this dataset folder has no source for (left as they are)
    unrepairable: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.unrepairable

    def summary(self) -> str:
        lines = [f"{self.store}: {len(self.written)} written, {len(self.skipped)} already done, {len(self.failed)} failed"]
        lines += [f"  REDONE {case}: it was damaged ({problem})" for case, problem in sorted(self.repaired.items())]
        lines += [f"  FAILED {case}: {message}" for case, message in sorted(self.failed.items())]
        lines += [
            f"  DAMAGED {case}: {problem} (no source for it in this dataset folder: delete the case folder or re-ingest it from its dataset)"
            for case, problem in sorted(self.unrepairable.items())
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------- one case


def load_case(source: CaseSource, modality: str | None = None, classes: dict[int, str] | None = None) -> tuple[Volume, LabelVolume | None]:
    """Read and check a case; return it reoriented to RAS (in memory).

    Raises:
        SpadkitError: unreadable files, NaN/Inf voxels, channel files that do not
            share one grid, or a label off the image's grid.
    """
    channels = [read_volume(path).load() for path in source.images]
    image = channels[0]
    if len(channels) > 1:
        for other in channels[1:]:
            if not other.shares_grid(image):
                raise InvalidImageError(
                    f"channel file does not share the grid of {source.images[0].name}",
                    path=other.source,
                    fix="all channels of a case must have the same shape and affine.",
                )
        image = Volume(np.concatenate([c.array for c in channels]), image.affine, meta=image.meta)
    image.modality = _channel_modality(modality, image.num_channels) or image.modality or sidecar_modality(source.images[0])
    image.meta["sources"] = [f for c in channels for f in c.meta.get("sources", [c.source])]
    if np.issubdtype(image.dtype, np.floating):
        bad = stats.count_where(image.array, lambda slab: ~np.isfinite(slab), image.source)
        if bad:
            raise InvalidImageError(
                f"{bad} voxels are NaN or Inf",
                path=image.source,
                fix="replace them (e.g. numpy.nan_to_num with the background value) and save the file again, or leave the case out.",
            )
    label = None
    if source.label is not None:
        label = _load_label(source.label, classes)
        label.check_matches(image)
    return image.canonical().load(), (label.canonical().load() if label is not None else None)


def _load_label(path: Path, classes: dict[int, str] | None) -> LabelVolume:
    """Read a label map into memory; a float map must hold whole finite numbers in every voxel (checked chunk-wise)."""
    volume = read_volume(path).load()
    if np.issubdtype(volume.dtype, np.floating):
        bad = stats.count_where(volume.array, lambda slab: ~np.isfinite(slab) | (slab != np.round(slab)), volume.source)
        if bad:
            raise InvalidImageError(
                f"label map holds {bad} non-integer or non-finite voxels",
                path=volume.source,
                fix="labels must be whole class numbers; was an image passed as a label?",
            )
    return LabelVolume(volume.array, volume.affine, classes=classes, meta=volume.meta)


def _channel_modality(codes: str | None, num_channels: int) -> str | None:
    """The modality string for a case from comma-joined ``codes``.

    One code per channel is kept as given (one code when they all agree); a list
    that does not match the channel count describes a mixed-modality dataset
    (AMOS: CT and MR scans) and says nothing about this case.
    """
    if not codes:
        return None
    parts = codes.split(",")
    if len(set(parts)) == 1:
        return parts[0]
    return codes if len(parts) == num_channels else None


def sidecar_modality(image_path: Path) -> str | None:
    """``Modality`` from a BIDS / dcm2niix JSON sidecar (``ct.nii.gz`` -> ``ct.json``), if any."""
    sidecar = image_path.with_name(case_id_from(image_path.name) + ".json")
    if not sidecar.is_file():
        return None
    try:
        value = json.loads(sidecar.read_text(encoding="utf-8")).get("Modality")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise InvalidImageError("sidecar is not a JSON object", path=sidecar, fix="repair or delete the sidecar file.") from None
    return str(value).upper() if value else None


def intensity_stats(image: Volume, label: LabelVolume | None = None) -> list[dict[str, Any]]:
    """Per-channel statistics of an image, computed chunk-wise (:func:`spadkit.stats.intensity_stats`).

    Each channel gets min/max/mean/std, percentiles and the voxel count, ``"body"``
    (PUMIT's foreground: voxels above the channel minimum) and, with a label,
    ``"foreground"`` (label > 0, which nnU-Net uses to normalise CT).
    """
    return stats.intensity_stats(image.array, None if label is None else label.array, image.source)


def ingest_case(source: CaseSource, store_url: str, modality: str | None, classes: dict[int, str] | None) -> dict[str, Any]:
    """Convert one case into the store; return ``{"case_id", "error"}`` (error is None on success)."""
    try:
        image, label = load_case(source, modality, classes)
        files = list(image.meta["sources"]) + (label.meta.get("sources", [label.source]) if label is not None else [])
        attrs = {
            "source": {
                "images": [str(p) for p in source.images],
                "label": str(source.label) if source.label else None,
                "files": [str(f) for f in dict.fromkeys(files)],  # every file read, e.g. a .nhdr and its data file
            },
            "intensity": intensity_stats(image, label),
            "spadkit_version": __version__,
        }
        OMEZarrStore(store_url, mode="a").write_case(source.case_id, image, label, attrs=attrs, author="spadkit ingest")
        return {"case_id": source.case_id, "error": None}
    except SpadkitError as err:
        return {"case_id": source.case_id, "error": str(err)}
    except Exception as err:  # an unexpected failure in one case must not lose the others
        return {"case_id": source.case_id, "error": f"{type(err).__name__}: {err} (while reading {source.images[0]})"}


# --------------------------------------------------------------------------- whole dataset


class _TqdmCallback(Callback):
    """Advance a tqdm bar as Dask finishes tasks on the local scheduler."""

    def __init__(self, bar: tqdm):
        super().__init__()
        self._bar = bar

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if isinstance(result, dict) and "case_id" in result:
            self._bar.update(1)
            self._bar.set_postfix_str(result["case_id"], refresh=False)


def ingest(
    dataset_dir: str | os.PathLike,
    store_url: str,
    *,
    entry: DatasetEntry | None = None,
    layout: str | None = None,
    modality: str | None = None,
    classes: dict[int, str] | None = None,
    num_workers: int | None = None,
    scheduler_address: str | None = None,
    overwrite: bool = False,
    repair: bool = False,
    progress: bool = True,
) -> IngestReport:
    """Convert a dataset folder into an OME-Zarr store (resumable, one run per store at a time).

    Args:
        dataset_dir: extracted dataset folder.
        store_url: output store (local path or fsspec URL).
        entry: catalog entry; gives layout, modality and label class names.
        layout: overrides the entry's/auto-detected layout (see :func:`discover_cases`).
        modality: overrides the entry's modality (e.g. ``"CT"``); comma-joined for several channels.
        classes: label value -> class name; overrides the entry's ``label_classes``.
        num_workers: local threads, at least 1 (default: :func:`default_workers`, from the available memory).
        scheduler_address: ``tcp://host:port`` of a ``dask.distributed`` scheduler.
        overwrite: redo cases that are already complete.
        repair: read every chunk of every complete case and redo the damaged ones
            (without it, a re-run checks that each case's arrays exist).
        progress: show a progress bar.

    Raises:
        StoreError: ``store_url`` is a file or cannot be written, or another ingest holds its lock.
        SpadkitError: bad ``num_workers``, an unreachable scheduler, or no cases in ``dataset_dir``.
    """
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1):
        raise SpadkitError(f"the number of workers must be at least 1, got {num_workers!r}", fix="omit --workers to size it from the available memory.")
    cases = discover_cases(dataset_dir, layout or (entry.layout if entry else None))
    if modality is None and entry is not None:
        modality = ",".join(entry.modality_codes)
    segmentation = entry is not None and entry.label_classes and any(t.value == "segmentation" for t in entry.task)
    if classes is None and segmentation:
        classes = dict(entry.label_classes)
    client = _connect(scheduler_address) if scheduler_address else None
    with contextlib.ExitStack() as stack:
        if client is not None:
            stack.enter_context(client)
        _prepare_out(store_url)
        stack.enter_context(store_lock(store_url, INGEST_LOCK, f"spadkit ingest of {dataset_dir}"))
        store = OMEZarrStore(store_url, mode="a")
        store.update_info(dataset=entry.name if entry else Path(dataset_dir).name, catalog_entry=entry.model_dump(mode="json") if entry else None, source=str(dataset_dir))
        report = IngestReport(store=store_url)
        _clear_broken(store, {c.case_id for c in cases}, report, deep=repair)
        done = set(store.cases())
        todo = []
        for case in cases:
            if case.case_id in done and not overwrite:
                report.skipped.append(case.case_id)
            else:
                todo.append(case)
        tasks = [dask.delayed(ingest_case, pure=False)(case, store_url, modality, classes) for case in todo]
        workers = num_workers or (default_workers(todo) if tasks and not scheduler_address else 1)
        with tqdm(total=len(tasks), desc="ingest", unit="case", disable=not progress or not tasks) as bar:
            results = _run(tasks, bar, workers, client)
        for result in results:
            if result["error"] is None:
                report.written.append(result["case_id"])
            else:
                report.failed[result["case_id"]] = result["error"]
        if store.cases():
            store.update_info(fingerprint=fingerprint(store))
    return report


def _prepare_out(store_url: str) -> None:
    """Refuse an output that is a file or cannot be created (local stores)."""
    root = local_root(store_url)
    if root is None:
        return
    if root.exists() and not root.is_dir():
        raise StoreError("--out is an existing file, not a store folder", path=root, fix="pass a new folder name (e.g. dataset.zarr) or the folder of an existing store.")
    try:
        (root / ".spadkit").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"cannot create the store here ({err.strerror or err})", path=root, fix="pass an --out in a folder you can write to.") from None


def _clear_broken(store: OMEZarrStore, sources: set[str], report: IngestReport, *, deep: bool) -> None:
    """Remove interrupted cases, and damaged ones that ``sources`` can redo (recorded in ``report``)."""
    from spadkit.check import check_case

    for case_id, status in store.scan().items():
        if isinstance(status, str):
            problem: str | None = f"its folder is damaged: {status}"
        elif not status.get("complete"):
            store.remove_case(case_id)  # interrupted earlier: never trust it
            continue
        else:
            problem = check_case(store, case_id, deep=deep)
        if problem is None:
            continue
        if case_id in sources:
            store.remove_case(case_id)
            report.repaired[case_id] = problem
        else:
            report.unrepairable[case_id] = problem


def available_memory() -> int:
    """Bytes this process can still allocate: the system's available memory, capped by a cgroup limit."""
    limits = []
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            limits += [int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:")]
    except OSError:
        limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = int(Path("/sys/fs/cgroup", usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            limits.append(max(int(limit) - usage, 0))
    return min(limits)


def _decoded_bytes(source: CaseSource) -> int:
    """Decoded voxel bytes of a case from its headers (0 if they cannot be read: the case fails later with the reason)."""
    total = 0
    for path in (*source.images, *((source.label,) if source.label else ())):
        try:
            volume = read_volume(path)
        except (SpadkitError, OSError):
            return 0
        total += math.prod(volume.shape) * volume.dtype.itemsize
    return total


def default_workers(cases: Sequence[CaseSource]) -> int:
    """Local workers for ``cases``: as many as the CPUs and the available memory allow.

    Each worker needs about :data:`CASE_MEMORY_FACTOR` times the decoded bytes of
    the largest of the first :data:`SIZE_SAMPLE` cases (read from their headers).
    """
    largest = max((_decoded_bytes(c) for c in cases[:SIZE_SAMPLE]), default=0)
    by_memory = available_memory() // max(1, int(CASE_MEMORY_FACTOR * largest))
    return int(max(1, min(os.cpu_count() or 1, by_memory)))


#: Seconds to wait for a ``dask.distributed`` scheduler to answer.
SCHEDULER_TIMEOUT_S = 10.0


def _connect(scheduler_address: str) -> Any:
    """A ``dask.distributed`` client for ``scheduler_address``, connected before anything is written."""
    from distributed import Client

    try:
        return Client(scheduler_address, timeout=SCHEDULER_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError, TypeError) as err:
        raise SpadkitError(
            f"cannot reach the Dask scheduler ({type(err).__name__}: {err})",
            path=scheduler_address,
            fix="check the address (tcp://HOST:PORT) and that the scheduler runs, or omit --scheduler to use local threads.",
        ) from None


def _run(tasks: list, bar: tqdm, num_workers: int, client: Any) -> list[dict[str, Any]]:
    if not tasks:
        return []
    if client is not None:
        from distributed import as_completed

        results = []
        for future in as_completed(client.compute(tasks)):
            results.append(future.result())
            bar.update(1)
        return results
    with _TqdmCallback(bar):
        return list(dask.compute(*tasks, scheduler="threads", num_workers=num_workers))


# --------------------------------------------------------------------------- fingerprint


def fingerprint(store: OMEZarrStore) -> dict[str, Any]:
    """Dataset fingerprint from the stored cases' attributes.

    Per modality (channel): pooled mean/std (exact, voxel-weighted), min/max,
    and the median over cases of each case's percentiles (the per-case
    percentiles are what PUMIT normalises with), also of the foreground
    ("body") percentiles where cases have them. Plus per-case spacing/shape and
    the dataset's median spacing and shape; the spacing statistics leave out
    cases whose pixel size was assumed (a PNG's 1 mm), unless all of them are.
    """
    per_case = {}
    by_modality: dict[str, list[dict[str, float]]] = {}
    for case_id in store.cases():
        attrs = store.case_attrs(case_id)
        modality_codes = (attrs.get("modality") or "unknown").split(",")
        per_case[case_id] = {
            "spacing_zyx_mm": attrs["spacing_zyx_mm"],
            "spacing_assumed": bool(attrs.get("spacing_assumed", False)),
            "shape_czyx": attrs["shape_czyx"],
            "modality": attrs.get("modality"),
        }
        for index, channel_stats in enumerate(attrs.get("intensity", [])):
            code = modality_codes[index] if index < len(modality_codes) else modality_codes[-1]
            by_modality.setdefault(f"{index}:{code}", []).append(channel_stats)
    measured = [c["spacing_zyx_mm"] for c in per_case.values() if not c["spacing_assumed"]]
    spacings = np.array(measured or [c["spacing_zyx_mm"] for c in per_case.values()])
    shapes = np.array([c["shape_czyx"][1:] for c in per_case.values()])
    return {
        "dataset": store.info.get("dataset"),
        "num_cases": len(per_case),
        "created": now_iso(),
        "spacing_zyx_mm": {
            "median": np.median(spacings, axis=0).tolist(),
            "min": spacings.min(axis=0).tolist(),
            "max": spacings.max(axis=0).tolist(),
            "assumed_cases_left_out": len(per_case) - len(measured) if measured else 0,
            "all_assumed": not measured,
        },
        "shape_zyx": {"median": np.median(shapes, axis=0).tolist(), "min": shapes.min(axis=0).tolist(), "max": shapes.max(axis=0).tolist()},
        "intensity": {channel: _pool(stats) for channel, stats in sorted(by_modality.items())},
        "cases": per_case,
    }


def _pool(stats: list[dict[str, float]]) -> dict[str, float]:
    counts = np.array([s["count"] for s in stats], dtype=float)
    means = np.array([s["mean"] for s in stats])
    second = np.array([s["std"] ** 2 + s["mean"] ** 2 for s in stats])
    mean = float(np.average(means, weights=counts))
    pooled = {
        "mean": mean,
        "std": float(np.sqrt(max(np.average(second, weights=counts) - mean**2, 0.0))),
        "min": float(min(s["min"] for s in stats)),
        "max": float(max(s["max"] for s in stats)),
        "num_cases": len(stats),
    }
    pooled.update({f"median_case_p{p:g}": float(np.median([s[f"p{p:g}"] for s in stats])) for p in PERCENTILES})
    bodies = [s["body"] for s in stats if "body" in s]
    if bodies:
        pooled.update({f"median_case_body_p{p:g}": float(np.median([b[f"p{p:g}"] for b in bodies])) for p in PERCENTILES})
    return pooled
