"""``PatchStream``: batches of spacing-aware patches straight from OME-Zarr stores.

Iterating a stream yields one epoch of ready-made batches (dicts of tensors)::

    stream = PatchStream(["brains.zarr", DatasetSource("ct.zarr", weight=0.5)], patch_size=96)
    for batch in stream:                      # or DataLoader(stream, batch_size=None)
        batch["image"]   # (B, C, Z, Y, X) float32, scaled intensities
        batch["spacing"] # (B, 3) float64, mm (Z, Y, X)

With label maps (``DatasetSource(label=...)``) each case's latest label version is
pinned when the stream is made, and ``batch["annotated"]`` says which voxels a
person labelled: a version saved with an annotated mask (a few corrected slices)
is known there only, and every patch is drawn to contain annotated voxels. A
:class:`~spadkit.data.plan.Split` gives a training and a validation stream
disjoint, fixed slices or cases of the same sources.

Patches are read in a pool of threads inside the consuming process (blosc
decoding and numpy copies release the GIL), so a batch never crosses a process
boundary; moving float patches between processes is what caps DataLoader
worker processes (PITFALLS 16, benchmarks/loader.py). The stream also works
under a ``DataLoader`` with worker processes: each worker produces every
``K``-th batch of the same plan, so the sequence is identical either way.

Sharding, seeding and resuming follow from :mod:`spadkit.data.plan`: a batch's
content depends only on ``(seed, epoch, group, step, slot)``, never on the
number of ranks, workers or threads, and ``state_dict()`` / ``load_state_dict()`` hold
``(epoch, next batch)``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from spadkit.data.boxes import crop_matrix, map_rows
from spadkit.data.cache import ChunkCache
from spadkit.data.geometry import margins, patch_affine, resample, zoomed_window
from spadkit.data.levels import BOX_RATIO, CaseAnnotations, read_annotations
from spadkit.data.patches import LabelSampler, PatchSize, UniformSampler, box_start
from spadkit.data.patches import coarse_axis_first as coarse_axis_first_of
from spadkit.data.plan import BatchSpec, EpochPlan, Split, make_plan
from spadkit.data.reader import (
    INTENSITY_MODES,
    CaseReader,
    Intensity,
    LabelIndex,
    LabelSelection,
    ReaderPool,
    select_label,
)
from spadkit.data.sources import (
    CaseInfo,
    DatasetSource,
    Mixing,
    dataset_probabilities,
    index_source,
)
from spadkit.errors import SpadkitError

Sampler = UniformSampler | LabelSampler


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: from ``torch.distributed`` when it is
    initialised, else torchrun's ``RANK``/``WORLD_SIZE``, else SLURM's
    ``SLURM_PROCID``/``SLURM_NTASKS`` (``srun``), else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("WORLD_SIZE", 1))
    return int(env.get("SLURM_PROCID", 0)), int(env.get("SLURM_NTASKS", 1))


class PatchStream(IterableDataset):
    """An epoch-based, sharded, resumable stream of patch batches.

    Args:
        sources: stores (paths/URLs) or :class:`DatasetSource` objects.
        patch_size: a :class:`PatchSize`, or voxels (int or ``(Z, Y, X)``) taken
            spacing-aware along the finest axis.
        batch_size: patches per batch (cases with the same patch shape and channels).
        sampler: :class:`UniformSampler` (default) or :class:`LabelSampler`.
        samples_per_case: patches drawn from a case per visit.
        mixing: ``"proportional"``, ``"uniform"`` or a temperature (see :mod:`.sources`).
        visits_per_epoch: case visits per epoch over all ranks (default: the number of cases).
        seed: seed of the plan and the patch positions.
        num_threads: reader threads in the consuming process (``0`` reads in the caller's thread).
        prefetch: batches read ahead (default ``2 * num_threads``).
        cache_bytes: bound of the decoded-chunk cache per process.
        intensity: ``"percentile"``, ``"zscore"`` or ``"none"`` (see :mod:`.reader`).
        interleave: consecutive groups whose batches alternate (more mixing between
            steps, but ``interleave * batch_size`` cases' chunks must fit the cache:
            with 1, a 32 MB cache doubled throughput on data 3x its size,
            benchmarks/loader.py).
        rank, world_size: DDP place (default: :func:`distributed_rank` at construction;
            the DataModule sets them from the trainer).
        fixed_epoch: always play this epoch from its first batch and never advance
            (validation: the same patches every time).
        coarse_axis_first: transpose patches of volumes whose thick slices lie along Y or
            X (sagittal/coronal stacks in RAS stores) so the coarse axis comes first, as
            the spacing rule expects; ``spacing`` and ``affine`` follow the transposition.
        split: draw only from one part of a fixed validation split of the labelled cases
            (:class:`~spadkit.data.plan.Split`); cases the part leaves empty are left out.
        joint_classes: ``K``, the number of classes shared by every annotation level
            (background 0 included), for one-stage joint learning from masks, boxes, image
            classes and unlabelled cases at once (UniMed). Cases of every level (and of any
            source) then share batches, and every batch carries all the level keys below, a
            sample's "unknown" where its case lacks the level. ``None``: as without it.

    Each batch is a dict:

    * ``image`` ``(B, C, Z, Y, X)`` float32; ``label`` ``(B, 1, Z, Y, X)`` int64 when
      the sources have a ``label``, with ``annotated`` ``(B, 1, Z, Y, X)`` bool: True
      where the label is known (everywhere, padding included, for a fully annotated
      version; else inside its annotated mask and the split's slices: voxels outside
      are unknown, never background);
    * ``spacing`` ``(B, 3)`` float64 mm ``(Z, Y, X)`` of the delivered voxels (after a
      token-grid crop's zoom); ``zoom`` ``(B, 3)``: delivered over stored spacing
      (1 where nothing was resampled); ``level`` ``(B,)`` int64: the SPAD anisotropy
      level, equal within a batch; ``spacing_assumed`` ``(B,)`` bool: the pixel size
      was assumed at ingest (a PNG's 1 mm), so its mm are not physical;
    * ``axes`` ``(B, 3)``: patch axis ``i`` is stored axis ``axes[i]`` (see
      ``coarse_axis_first``); ``start`` ``(B, 3)`` stored voxel ``(z, y, x)`` of the
      read window's corner (negative where padded);
    * ``affine`` ``(B, 4, 4)`` float64 in MONAI's convention (columns follow the
      patch's array axes Z, Y, X: ``MetaTensor(image[b], affine=affine[b])``, see
      :mod:`.geometry`); ``origin`` ``(B, 3)`` RAS mm of voxel ``[0, 0, 0]``;
    * ``case_id``, ``dataset``, ``modality``: lists of B;
    * ``stream``: where the batch sits in the stream, ``{"epoch", "index", "group",
      "step"}``, each a list of B equal Python ints: ``epoch`` and ``index`` are the
      batch's place on this rank (for resuming); ``(epoch, group, step)`` is its global
      draw key, the same on every rank layout (it seeds augmentation and masks,
      :func:`~spadkit.data.augment.batch_seed`). Lists of B, so MONAI's
      ``decollate_batch`` gives each item its own ints, and not tensors, so Lightning
      leaves them on the host (reading them never waits for the GPU).

    With ``joint_classes=K`` every batch also has, for every sample:

    * ``label`` and ``annotated`` as above, label 0 and ``annotated`` all False where the
      case has no label map (or its source no ``label``);
    * ``boxes``: a list of B float32 tensors ``(n, 7)`` ``[class, z0, y0, x0, z1, y1, x1]``,
      the case's boxes (``DatasetSource(boxes=...)``) in the delivered patch's voxel edges,
      after zoom, transposition (and :class:`~spadkit.data.BatchAugment`'s flips and
      rotations), clipped to the patch; boxes that miss it are dropped (:mod:`.boxes`);
    * ``box_known`` ``(B, K)`` bool: the case's box set is exhaustive for class k, so a
      voxel outside its boxes of class k is known not to be k;
    * ``image_classes`` ``(B, K)`` int8: 1 known present in the case, 0 known absent,
      -1 unknown (``DatasetSource(classes=...)``); case-level, not patch-level;
    * ``levels``: list of B tuples, each sample's annotation levels (a subset of
      :data:`~spadkit.io.annotations.LEVELS`; ``()`` for an unlabelled case).

    A patch of a case with boxes overlaps one of them with probability
    :data:`~spadkit.data.levels.BOX_RATIO` (else the sampler places it; a
    :class:`LabelSampler` applies to the cases with a label map, the others are uniform).
    Where such a case also has a partial label map, a patch drawn onto a box may miss its
    annotated voxels: its boxes supervise it.
    """

    def __init__(
        self,
        sources: Sequence[str | Path | DatasetSource],
        patch_size: PatchSize | int | Sequence[int] = 96,
        *,
        batch_size: int = 2,
        sampler: Sampler | None = None,
        samples_per_case: int = 8,
        mixing: Mixing = "proportional",
        visits_per_epoch: int | None = None,
        seed: int = 0,
        num_threads: int = 2,
        prefetch: int | None = None,
        cache_bytes: int = 512 << 20,
        intensity: Intensity = "percentile",
        interleave: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        fixed_epoch: int | None = None,
        coarse_axis_first: bool = True,
        split: Split | None = None,
        joint_classes: int | None = None,
    ):
        super().__init__()
        if not sources:
            raise ValueError("PatchStream needs at least one source store")
        for name, value in (("batch_size", batch_size), ("samples_per_case", samples_per_case), ("interleave", interleave)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, not {intensity!r}")
        if joint_classes is not None and (isinstance(joint_classes, bool) or int(joint_classes) != joint_classes or joint_classes < 2):
            raise ValueError(f"joint_classes is the number of classes including background 0 (>= 2), got {joint_classes!r}")
        self.sources = [s if isinstance(s, DatasetSource) else DatasetSource(store=s) for s in sources]
        if joint_classes is None and any(s.boxes is not None or s.classes is not None for s in self.sources):
            raise ValueError("boxes=... and classes=... on a DatasetSource need PatchStream(joint_classes=K), the number of joint classes")
        self.joint_classes = None if joint_classes is None else int(joint_classes)
        self.patch_size = patch_size if isinstance(patch_size, PatchSize) else PatchSize(voxels=patch_size)
        self.batch_size = int(batch_size)
        self.sampler = sampler or UniformSampler()
        self.samples_per_case = int(samples_per_case)
        self.seed = int(seed)
        self.num_threads = int(num_threads)
        self.prefetch = prefetch if prefetch is not None else max(2, 2 * self.num_threads)
        self.cache_bytes = int(cache_bytes)
        self.intensity = intensity
        self.interleave = int(interleave)
        self.cases: list[list[CaseInfo]] = [index_source(s) for s in self.sources]
        if self.sampler.needs_labels and self.joint_classes is None and any(s.label is None for s in self.sources):
            raise ValueError("LabelSampler needs label=... on every DatasetSource (which label map to use)")
        if split is not None and any(s.label is None for s in self.sources):
            raise ValueError("a validation split needs label=... on every DatasetSource (it splits labelled cases or slices)")
        self.split = split
        self.selections = self._select_labels()
        #: Per dataset, per case: its pinned boxes and image classes (with ``joint_classes`` only).
        self.annotations: list[list[CaseAnnotations]] | None = None if self.joint_classes is None else self._read_annotations()
        self.shares = dataset_probabilities([len(c) for c in self.cases], mixing, [s.weight for s in self.sources])
        self.visits_per_epoch = int(visits_per_epoch or sum(len(c) for c in self.cases))
        self.axes = [[coarse_axis_first_of(c.spacing, c.spatial_shape) if coarse_axis_first else (0, 1, 2) for c in cases] for cases in self.cases]
        self.patch_shapes = [
            [self.patch_size.shape_for(_permuted(c.spacing, a), _permuted(c.spatial_shape, a)) for c, a in zip(cases, axes)]
            for cases, axes in zip(self.cases, self.axes)
        ]
        self.levels = [
            [self.patch_size.level_for(_permuted(c.spacing, a), _permuted(c.spatial_shape, a)) for c, a in zip(cases, axes)]
            for cases, axes in zip(self.cases, self.axes)
        ]
        #: Cases share a batch only with equal keys: channels, anisotropy level, patch shape, whether
        #: labels are read (two shapes can be equal at two levels: 2.5 mm slices at 0.62 and 0.65 mm pixels).
        #: With joint_classes every batch carries every level, so labelled and unlabelled cases mix.
        self.batch_keys = [
            [(case.shape[0], level, *shape, case.label is not None or self.joint_classes is not None) for case, level, shape in zip(cases, levels, shapes)]
            for cases, levels, shapes in zip(self.cases, self.levels, self.patch_shapes)
        ]
        _warn_assumed_spacing(self.cases, self.patch_size)
        self.rank, self.world_size = distributed_rank() if rank is None else (rank, world_size or 1)
        self.fixed_epoch = fixed_epoch
        self._epoch = fixed_epoch or 0
        self._next_batch = 0
        self._pool: ReaderPool | None = None
        self._pool_pid: int | None = None
        self._plans: dict[int, EpochPlan] = {}
        #: Record a batch as consumed when it is handed out. A consumer that fetches ahead
        #: (Lightning) turns this off and calls :meth:`mark_consumed` when a batch is used.
        self.auto_mark = True

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for spawned DataLoader workers: without readers, cache and locks."""
        state = self.__dict__.copy()
        state.update(_pool=None, _pool_pid=None, _plans={})
        return state

    # ------------------------------------------------------------------ plan and state
    def set_distributed(self, rank: int, world_size: int) -> None:
        """Place this stream in a DDP job (call in every rank before iterating)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self._plans.clear()

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's batches of ``epoch`` (the last two epochs' plans are kept)."""
        if epoch not in self._plans:
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = self._make_plan(epoch)
        return self._plans[epoch]

    def _make_plan(self, epoch: int) -> EpochPlan:
        return make_plan(
            self.batch_keys,
            self.shares,
            visits_per_epoch=self.visits_per_epoch,
            batch_size=self.batch_size,
            samples_per_case=self.samples_per_case,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            interleave=self.interleave,
        )

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return len(self.plan(self._epoch))

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: the next batch to deliver, plus what must match on resume."""
        return {
            "epoch": self._epoch,
            "next_batch": self._next_batch,
            "seed": self.seed,
            "batches_per_epoch": len(self),
            "settings": self.settings_digest(),
        }

    def settings_digest(self) -> str:
        """Short hash of everything that decides which patches come in which order
        (cases, patch shapes, batching, mixing, sampler, intensity, world size)."""
        parts = (
            [(c.store, c.case_id, c.level, c.label) for cases in self.cases for c in cases],
            self.patch_shapes,
            self.axes,
            repr(self.patch_size),
            self.shares.round(12).tolist(),
            (self.batch_size, self.samples_per_case, self.visits_per_epoch, self.interleave, self.world_size),
            repr(self.sampler),
            self.intensity,
            repr(self.split),
        )
        if self.joint_classes is not None:  # appended only here, so streams without it keep their digests
            parts += (self.joint_classes, [(c.boxes, c.classes) for cases in self.cases for c in cases])
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the plan must be the one it was saved with."""
        if state.get("seed") != self.seed:
            raise ValueError(f"the saved stream used seed {state.get('seed')}, this one {self.seed}: the resumed batches would differ")
        if state.get("settings") not in (None, self.settings_digest()):
            raise ValueError(
                "the saved stream was made with other cases, patch sizes, batching, sampler, intensity "
                "or world size: the resumed batches would differ. Fix: resume with the same data settings."
            )
        epoch, next_batch = int(state["epoch"]), int(state["next_batch"])
        batches = len(self.plan(epoch))
        if state.get("batches_per_epoch") not in (None, batches):
            raise ValueError(
                f"the saved stream had {state['batches_per_epoch']} batches per epoch, this one {batches}: "
                "its sources, patch size, batch size or world size changed. Fix: resume with the same settings."
            )
        self._epoch, self._next_batch = epoch, next_batch

    def mark_consumed(self, stream: Mapping[str, Sequence[int]]) -> None:
        """Record that the batch of ``batch["stream"]`` (its ``epoch`` and ``index``) was used; the next one follows it."""
        epoch, index = int(stream["epoch"][0]), int(stream["index"][0])
        if self.fixed_epoch is not None or (epoch, index) < (self._epoch, self._next_batch - 1):
            return
        self._epoch, self._next_batch = epoch, index + 1
        if self._next_batch >= len(self.plan(epoch)):
            self._epoch, self._next_batch = epoch + 1, 0

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, start = self._epoch, self._next_batch
        plan = self.plan(epoch)
        worker = get_worker_info()
        indices = range(start, len(plan))
        if worker is not None:
            # The DataLoader collects from worker 0, 1, ... in turn, so worker w must hold
            # start + w, start + w + K, ... (not i % K == w, which reorders a resumed epoch).
            indices = range(start + worker.id, len(plan), worker.num_workers)
        for batch in self._produce(plan, indices):
            if worker is None and self.auto_mark:
                self.mark_consumed(batch["stream"])
            yield batch

    def _produce(self, plan: EpochPlan, indices: range) -> Iterator[dict[str, Any]]:
        if self.num_threads == 0:
            for i in indices:
                yield self.read_batch(plan.epoch, plan.batch(i))
            return
        pending: deque[Future] = deque()
        todo = iter(indices)
        with ThreadPoolExecutor(self.num_threads, thread_name_prefix="spadkit-patch") as pool:
            try:
                for i in todo:
                    pending.append(pool.submit(self.read_batch, plan.epoch, plan.batch(i)))
                    if len(pending) >= self.prefetch:
                        break
                while pending:
                    batch = pending.popleft().result()
                    nxt = next(todo, None)
                    if nxt is not None:
                        pending.append(pool.submit(self.read_batch, plan.epoch, plan.batch(nxt)))
                    yield batch
            finally:
                for future in pending:
                    future.cancel()

    def _readers(self) -> ReaderPool:
        """This process's readers and chunk cache (made anew in a forked worker)."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ReaderPool(ChunkCache(self.cache_bytes), self.intensity)
            self._pool_pid = os.getpid()
        return self._pool

    @property
    def cache(self) -> ChunkCache:
        return self._readers().cache

    def read_batch(self, epoch: int, spec: BatchSpec) -> dict[str, Any]:
        """Read the batch ``spec`` of ``epoch`` (thread-safe)."""
        pool = self._readers()
        cases = [self.cases[d][c] for d, c in spec.cases]
        shape = self.patch_shapes[spec.cases[0][0]][spec.cases[0][1]]
        level = self.levels[spec.cases[0][0]][spec.cases[0][1]]
        image = torch.empty((len(cases), cases[0].shape[0], *shape), dtype=torch.float32)
        joint = self.joint_classes is not None
        label = torch.empty((len(cases), 1, *shape), dtype=torch.int64) if cases[0].label is not None or joint else None
        annotated = torch.empty((len(cases), 1, *shape), dtype=torch.bool) if label is not None else None
        starts = np.empty((len(cases), 3), dtype=np.int64)
        zooms = np.ones((len(cases), 3), dtype=np.float64)
        axes = [self.axes[d][c] for d, c in spec.cases]
        for slot, ((d, c), case) in enumerate(zip(spec.cases, cases)):
            reader = pool.get(case, self.selections[d][c])
            rng = np.random.default_rng([self.seed, epoch, spec.group, spec.step, slot])
            window = self._zoomed_window(case, axes[slot], shape, level, rng)
            zooms[slot] = [w / n for w, n in zip(window, shape)]
            notes = self.annotations[d][c] if joint else None
            starts[slot] = self._start(case, reader, notes, _unpermuted(window, axes[slot]), rng)
            _read_zoomed(reader.read_image, starts[slot], image[slot], axes[slot], window)
            if label is not None and reader.label is None:  # a joint batch: this case has no label map
                label[slot], annotated[slot] = 0, False
            elif label is not None:
                _read_zoomed(reader.read_label, starts[slot], label[slot], axes[slot], window, labels=True)
                _read_zoomed(reader.read_annotated, starts[slot], annotated[slot], axes[slot], window, labels=True)
        affines = np.stack([patch_affine(case.affine, start, a, z) for case, start, a, z in zip(cases, starts, axes, zooms)])
        batch = {
            "image": image,
            "spacing": torch.tensor([_permuted(c.spacing, a) for c, a in zip(cases, axes)], dtype=torch.float64) * torch.from_numpy(zooms),
            "zoom": torch.from_numpy(zooms),
            "level": torch.full((len(cases),), level, dtype=torch.int64),
            "spacing_assumed": torch.tensor([c.spacing_assumed for c in cases]),
            "axes": torch.tensor(axes),
            "start": torch.from_numpy(starts),
            "origin": torch.from_numpy(affines[:, :3, 3].copy()),
            "affine": torch.from_numpy(affines),
            "case_id": [c.case_id for c in cases],
            "dataset": [c.dataset for c in cases],
            "modality": [c.modality for c in cases],
            "stream": {key: [int(value)] * len(cases) for key, value in (("epoch", epoch), ("index", spec.index), ("group", spec.group), ("step", spec.step))},
        }
        if label is not None:
            batch["label"], batch["annotated"] = label, annotated
        if joint:
            notes = [self.annotations[d][c] for d, c in spec.cases]
            batch.update(self._joint_entries(notes, starts, axes, zooms, shape), levels=[n.levels for n in notes])
        return batch

    def _start(self, case: CaseInfo, reader: CaseReader, notes: CaseAnnotations | None, window: Sequence[int], rng: np.random.Generator) -> tuple[int, int, int]:
        """The stored start of a patch: on one of the case's boxes with probability :data:`BOX_RATIO`, else the sampler's."""
        if notes is not None and notes.rows is not None and len(notes.rows) and rng.random() < BOX_RATIO:
            return box_start(case.spatial_shape, window, notes.rows[:, 1:], rng)
        index = reader.label_index() if reader.label is not None and (self.sampler.needs_labels or reader.partial) else None
        locations, known = (None, None) if index is None else (index.classes, index.annotated)
        return self.sampler.start(case.spatial_shape, window, rng, locations, known)

    def _joint_entries(self, notes: Sequence[CaseAnnotations], starts: np.ndarray, axes: Sequence[Sequence[int]], zooms: np.ndarray, shape: Sequence[int]) -> dict[str, Any]:
        """``boxes``, ``box_known`` and ``image_classes`` of a batch (see the class docstring)."""
        k = self.joint_classes
        return {
            "boxes": [
                torch.zeros((0, 7)) if n.rows is None else torch.from_numpy(map_rows(n.rows, crop_matrix(s, a, z), shape))
                for n, s, a, z in zip(notes, starts, axes, zooms)
            ],
            "box_known": torch.from_numpy(np.stack([n.box_known(k) for n in notes])),
            "image_classes": torch.from_numpy(np.stack([n.image_classes(k) for n in notes])),
        }

    def _read_annotations(self) -> list[list[CaseAnnotations]]:
        """Pin every case's box set and image classes (read once, so a save while training changes nothing)."""
        pool = ReaderPool(ChunkCache(0), self.intensity)
        return [[read_annotations(pool.store(c), c, self.joint_classes) for c in cases] for cases in self.cases]

    # ------------------------------------------------------------------ labels
    def _select_labels(self) -> list[list[LabelSelection | None]]:
        """Pin every labelled case's version and split part (:func:`~spadkit.data.reader.select_label`),
        and leave out the cases (then the sources) the split leaves nothing."""
        pool = ReaderPool(ChunkCache(0), self.intensity)
        selections = [[None if c.label is None else select_label(pool.store(c), c, self.split) for c in cases] for cases in self.cases]
        kept = [[i for i, sel in enumerate(sels) if sel is None or sel.slices != ()] for sels in selections]
        if not any(kept):
            raise SpadkitError(
                f"the {self.split.part} part of the split (fraction {self.split.fraction} by {self.split.by}) holds no annotated "
                f"{self.split.by} of the {sum(map(len, self.cases))} case(s)",
                path=self.sources[0].store,
                fix="annotate more slices or cases, change the fraction, or give validation stores (val=[...]) instead of a split.",
            )
        datasets = [d for d, keep in enumerate(kept) if keep]
        self.sources = [self.sources[d] for d in datasets]
        self.cases = [[self.cases[d][i] for i in kept[d]] for d in datasets]
        return [[selections[d][i] for i in kept[d]] for d in datasets]

    def label_indexes(self) -> list[tuple[CaseInfo, LabelSelection, LabelIndex]]:
        """Every labelled case with its selection and :class:`~spadkit.data.reader.LabelIndex`
        (scanned once per case in this process, in ``num_threads`` threads; the samplers reuse it)."""
        pool = self._readers()
        pairs = [(case, sel) for cases, sels in zip(self.cases, self.selections) for case, sel in zip(cases, sels) if sel is not None]
        with ThreadPoolExecutor(max(1, self.num_threads), thread_name_prefix="spadkit-scan") as threads:
            indexes = list(threads.map(lambda pair: pool.get(*pair).label_index(), pairs))
        return [(case, sel, index) for (case, sel), index in zip(pairs, indexes)]

    def check_inputs(self, in_chans: int, num_classes: int | None = None) -> None:
        """Raise now, not mid-training, where a case does not fit a model of ``in_chans`` channels and
        ``num_classes`` voxel classes (None: skip the label scan): other channels, or an annotated
        voxel of a class outside ``0..num_classes - 1``.

        Raises:
            SpadkitError: naming the case (and label version) and the fix.
        """
        for case in (c for cases in self.cases for c in cases):
            if case.shape[0] != in_chans:
                raise SpadkitError(
                    f"case {case.case_id} has {case.shape[0]}-channel images, the model takes in_chans={in_chans}",
                    path=case.store,
                    fix=f"set in_chans={case.shape[0]} (model.init_args.in_chans in YAML) with a backbone of that many channels "
                    f"(or none), or ingest {in_chans}-channel images.",
                )
        if num_classes is None:
            return
        for case, selection, index in self.label_indexes():
            bad = [v for v in index.classes if not 0 <= v < num_classes]
            if bad:
                raise SpadkitError(
                    f"case {case.case_id}: label {case.label!r} version {selection.version} holds class(es) {bad} on annotated "
                    f"voxels, the model is configured for {num_classes} classes (0..{num_classes - 1})",
                    path=case.store,
                    fix=f"set num_classes={max(index.classes) + 1} (model.init_args.num_classes in YAML) if those are real classes, "
                    "or remap the label values (an 'unknown' value belongs outside the annotated mask).",
                )

    def _zoomed_window(self, case: CaseInfo, axes: Sequence[int], shape: Sequence[int], level: int, rng: np.random.Generator) -> tuple[int, int, int]:
        """The window ``(Z, Y, X)`` (patch axes) a crop reads: ``shape`` zoomed by :meth:`PatchSize.draw_zoom`,
        or ``shape`` itself where rounding the window would change the case's anisotropy level."""
        spacing, spatial = _permuted(case.spacing, axes), _permuted(case.spatial_shape, axes)
        window = zoomed_window(shape, self.patch_size.draw_zoom(spacing, spatial, rng))
        zoomed = [s * w / n for s, w, n in zip(spacing, window, shape)]
        return window if self.patch_size.level_for(zoomed, spatial) == level else tuple(shape)

    def loader(self, num_workers: int = 0, **kwargs: Any) -> DataLoader:
        """A ``DataLoader`` over this stream that records consumed positions (for
        ``state_dict``) also when batches come from worker processes."""
        return StreamLoader(self, num_workers=num_workers, **kwargs)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{cases[0].dataset}: {len(cases)}" for cases in self.cases)
        return f"PatchStream({sizes}; patch={self.patch_size}, batch={self.batch_size}, rank={self.rank}/{self.world_size}, batches/epoch={len(self)})"


class StreamLoader(DataLoader):
    """``DataLoader(stream, batch_size=None)`` that tells the stream which batches were consumed."""

    def __init__(self, stream: PatchStream, **kwargs: Any):
        kwargs.setdefault("persistent_workers", False)  # a persistent worker would keep an old epoch's copy
        super().__init__(stream, batch_size=None, **kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in super().__iter__():
            if self.dataset.auto_mark:
                self.dataset.mark_consumed(batch["stream"])
            yield batch


def _warn_assumed_spacing(cases: Sequence[Sequence[CaseInfo]], size: PatchSize) -> None:
    """Physical patch sizes are not physical on cases whose pixel size was assumed at ingest."""
    assumed = [c for dataset in cases for c in dataset if c.spacing_assumed]
    if assumed and size.mm is not None:
        warnings.warn(
            f"{len(assumed)} case(s) (e.g. {assumed[0].case_id} of {assumed[0].dataset}) have an assumed pixel size "
            f"{assumed[0].spacing[1:]} mm (no resolution in the file): PatchSize(mm=...) takes that many voxels per mm "
            "there, which is not a physical size. Fix: give the patch in voxels or tokens, or re-ingest with the true spacing.",
            stacklevel=3,
        )


def _permuted(values: Sequence, axes: Sequence[int]) -> tuple:
    return tuple(values[a] for a in axes)


def _unpermuted(values: Sequence, axes: Sequence[int]) -> tuple:
    out = [0, 0, 0]
    for i, a in enumerate(axes):
        out[a] = values[i]
    return tuple(out)


def _read_zoomed(
    read: Callable[[Sequence[int], np.ndarray], None],
    start: Sequence[int],
    out: torch.Tensor,
    axes: Sequence[int],
    window: Sequence[int],
    *,
    labels: bool = False,
) -> None:
    """``read`` the stored window at ``start`` into ``out`` ``(C, *patch)``: its spatial axes are the
    stored axes ``axes``, and a ``window`` (patch axes) other than the patch is resampled to it."""
    patch = tuple(out.shape[1:])
    if tuple(window) == patch and tuple(axes) == (0, 1, 2):
        read(start, out.numpy())
        return
    margin = _unpermuted(margins(window, patch), axes)
    stored = np.empty((out.shape[0], *(w + 2 * m for w, m in zip(_unpermuted(window, axes), margin))), dtype=out.numpy().dtype)
    read([s - m for s, m in zip(start, margin)], stored)
    stored = stored.transpose(0, *(1 + a for a in axes))
    if tuple(window) == patch:
        out.numpy()[...] = stored
    else:
        out.copy_(resample(stored, patch, window, labels=labels))
