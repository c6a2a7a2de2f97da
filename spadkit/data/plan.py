"""The epoch plan: which cases each batch of each rank comes from.

The plan is a pure function of the seed, the epoch and the case index, so every
DDP rank and every DataLoader worker computes the same plan on its own, without
communicating, and a resumed run recomputes it exactly:

1. Visits per dataset follow the mixing probabilities (largest-remainder
   rounding of ``visits_per_epoch``). Within a dataset, cases are visited in
   shuffled order, cycling when a dataset gets more visits than cases, so every
   case is visited ``floor`` or ``ceil`` of its share and none is left out.
2. Visits are shuffled, then grouped ``batch_size`` at a time among cases whose
   patches can share a batch (same channels and patch shape: one token grid per
   batch). A group yields ``samples_per_case`` batches, each with one patch from
   every case of the group (as TorchIO's ``samples_per_volume``). A shape's last,
   short group is filled with other cases of that shape drawn at random (extra
   visits); a case repeats inside a batch only when fewer than ``batch_size``
   cases share its shape.
3. Groups are shuffled and padded by wrap-around to a count fixed for the run,
   ``ceil(visits / batch_size) + shapes - 1`` rounded up to a multiple of the
   world size (the most any epoch can need), so every epoch has the same length
   (Lightning reads it once). Rank ``r`` takes groups ``r, r + world, ...``:
   every rank has the same number of batches (unequal counts hang NCCL,
   PITFALLS 10), no visit is dropped, and only the padding groups repeat visits.
4. Batches are ordered so that ``interleave`` consecutive groups alternate,
   which mixes cases across consecutive steps while keeping each case's chunks
   hot in the cache.

A DataLoader with ``K`` workers, resuming at batch ``s``, gives worker ``w`` the
batches ``s + w, s + w + K, ...``; the loader's in-order delivery (worker 0, 1,
... in turn) then yields exactly the rank's batch sequence, whatever ``K`` is.

A :class:`Split` decides, before any plan, which cases or slices a stream may draw
from: a training and a validation stream of the same sources get disjoint parts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from spadkit.data.sources import allocate_visits


@dataclass(frozen=True)
class Split:
    """A validation split that is fixed once: adding labels never moves an item between parts.

    An item (a whole case with ``by="case"``, or one Z slice of a case with ``by="slice"``)
    belongs to the validation part when a hash of its name, read as a number in [0, 1), is
    below ``fraction``. The hash depends on the item alone (case id, and the slice's index at
    pyramid level 0), not on the seed, the other items or their order: slices annotated later
    join a part without moving any earlier one, and every run, rank and worker agrees.

    Args:
        fraction: expected share of items held out for validation, in (0, 1).
        by: ``"slice"`` (Z slices: axial in RAS stores, the unit a person corrects) or ``"case"``.
        part: the part a stream draws from: ``"train"`` or ``"validation"``.
    """

    fraction: float
    by: Literal["case", "slice"] = "slice"
    part: Literal["train", "validation"] = "train"

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"the validation fraction must lie in (0, 1), got {self.fraction!r}")
        if self.by not in ("case", "slice"):
            raise ValueError(f"split by 'case' or 'slice', not {self.by!r}")
        if self.part not in ("train", "validation"):
            raise ValueError(f"the part must be 'train' or 'validation', not {self.part!r}")

    def is_validation(self, case_id: str, slice_index: int | None = None) -> bool:
        """Whether the case (``by="case"``) or its level-0 slice ``slice_index`` is held out."""
        key = case_id if self.by == "case" else f"{case_id}/z{int(slice_index)}"
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 < self.fraction

    def selects(self, case_id: str, slice_index: int | None = None) -> bool:
        """Whether the item belongs to this split's ``part``."""
        return self.is_validation(case_id, slice_index) == (self.part == "validation")


@dataclass(frozen=True)
class BatchSpec:
    """One batch of the plan: where its patches come from and how to seed them."""

    index: int
    """Position in the rank's batch sequence."""
    group: int
    """Global group id (the same on every rank)."""
    step: int
    """Which of the group's ``samples_per_case`` batches this is."""
    cases: tuple[tuple[int, int], ...]
    """``(dataset index, case index)`` per patch."""


@dataclass(frozen=True)
class EpochPlan:
    """A rank's batches for one epoch (see the module docstring)."""

    epoch: int
    group_ids: np.ndarray
    """``(G,)`` global ids of this rank's groups."""
    slots: np.ndarray
    """``(G, B, 2)``: ``(dataset, case)`` of each patch slot of each group."""
    order: np.ndarray
    """``(G * S, 2)``: ``(local group, step)`` of each batch, in delivery order."""

    def __len__(self) -> int:
        return len(self.order)

    def batch(self, index: int) -> BatchSpec:
        local, step = (int(v) for v in self.order[index])
        cases = tuple((int(d), int(c)) for d, c in self.slots[local])
        return BatchSpec(index=index, group=int(self.group_ids[local]), step=step, cases=cases)


def make_plan(
    batch_keys: Sequence[Sequence[Hashable]],
    visit_shares: np.ndarray,
    *,
    visits_per_epoch: int,
    batch_size: int,
    samples_per_case: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    interleave: int = 4,
) -> EpochPlan:
    """Build the plan of one rank for one epoch.

    Args:
        batch_keys: per dataset, per case, a key; only cases with equal keys share a
            batch (channels, patch shape, whether labels are read).
        visit_shares: per-dataset share of visits (sums to 1).
        visits_per_epoch: total case visits over all ranks.
        batch_size: patches per batch (cases per group).
        samples_per_case: batches per group (patches per visit).
        seed, epoch: the plan's randomness.
        rank, world_size: this process's place in DDP.
        interleave: consecutive groups whose batches alternate.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    rng = np.random.default_rng([seed, epoch])
    counts = allocate_visits(visits_per_epoch, visit_shares)
    visits, pools = [], {}
    for dataset, (count, keys) in enumerate(zip(counts, batch_keys)):
        if not count:
            continue
        for case, key in enumerate(keys):
            pools.setdefault(key, []).append((dataset, case))
        rounds = -(-int(count) // len(keys))
        cases = np.concatenate([rng.permutation(len(keys)) for _ in range(rounds)])[:count]
        visits.extend((dataset, int(c)) for c in cases)
    visits = [visits[i] for i in rng.permutation(len(visits))]
    groups = _group_by_key(visits, lambda v: batch_keys[v[0]][v[1]], batch_size, pools, rng)
    groups = [groups[i] for i in rng.permutation(len(groups))]
    # A fixed count every epoch: the most groups any split of the visits over the keys can need.
    fixed = -(-len(visits) // batch_size) + len(pools) - 1
    fixed += -fixed % world_size
    groups += [groups[i % len(groups)] for i in range(fixed - len(groups))]
    ids = np.arange(rank, len(groups), world_size)
    slots = np.asarray([groups[i] for i in ids], dtype=np.int64).reshape(len(ids), batch_size, 2)
    return EpochPlan(epoch=epoch, group_ids=ids, slots=slots, order=_interleaved_order(len(ids), samples_per_case, interleave))


def _group_by_key(
    visits: list[tuple[int, int]],
    key: Callable[[tuple[int, int]], Hashable],
    size: int,
    pools: dict[Hashable, list[tuple[int, int]]],
    rng: np.random.Generator,
) -> list[list[tuple[int, int]]]:
    """Cut visits into groups of ``size`` with one key each. A key's short last group is
    filled with other cases of that key (``pools``), drawn at random; a case repeats in a
    group only when fewer than ``size`` cases share the key."""
    buckets: dict[Hashable, list[tuple[int, int]]] = {}
    for visit in visits:
        buckets.setdefault(key(visit), []).append(visit)
    groups = []
    for bucket_key, bucket in buckets.items():
        for start in range(0, len(bucket), size):
            group = bucket[start : start + size]
            if len(group) < size:
                pool = pools[bucket_key]
                others = [pool[i] for i in rng.permutation(len(pool)) if pool[i] not in group]
                fill = (others or group) * size
                group = group + fill[: size - len(group)]
            groups.append(group)
    return groups


def _interleaved_order(num_groups: int, steps: int, interleave: int) -> np.ndarray:
    """``(num_groups * steps, 2)`` of ``(group, step)``: blocks of ``interleave`` groups,
    step-major inside a block."""
    order = []
    for first in range(0, num_groups, interleave):
        block = range(first, min(first + interleave, num_groups))
        order.extend((g, s) for s in range(steps) for g in block)
    return np.asarray(order, dtype=np.int64).reshape(-1, 2)
