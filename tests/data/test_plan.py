"""Dataset mixing and the epoch plan: shares, visit counts, sharding over ranks, batch grouping."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from spadkit.data import dataset_probabilities
from spadkit.data.plan import make_plan
from spadkit.data.sources import allocate_visits


# ---------------------------------------------------------------------------------- mixing
def test_proportional_uniform_and_temperature_shares():
    np.testing.assert_allclose(dataset_probabilities([10, 30]), [0.25, 0.75])
    np.testing.assert_allclose(dataset_probabilities([10, 30], "uniform"), [0.5, 0.5])
    np.testing.assert_allclose(dataset_probabilities([10, 30], 1.0), [0.25, 0.75])
    np.testing.assert_allclose(dataset_probabilities([10, 40], 2.0), [1 / 3, 2 / 3])  # sqrt: 3.16 : 6.32
    hot = dataset_probabilities([1, 1000], 1e6)
    assert abs(hot[0] - 0.5) < 1e-3  # high temperature approaches uniform
    assert dataset_probabilities([7], 3.0).tolist() == [1.0]


def test_weights_multiply_the_shares():
    np.testing.assert_allclose(dataset_probabilities([10, 30], weights=[1.0, 0.5]), [0.4, 0.6])
    np.testing.assert_allclose(dataset_probabilities([10, 30], "uniform", weights=[3, 1]), [0.75, 0.25])
    np.testing.assert_allclose(dataset_probabilities([10, 30, 5], weights=[1, 0, 1]), [10 / 15, 0, 5 / 15])


def test_weights_that_leave_nothing_raise_with_a_fix():
    with pytest.raises(ValueError, match=r"zero share.*\n?.*Fix: give at least one dataset a positive weight"):
        dataset_probabilities([10, 30], weights=[0, 0])


@pytest.mark.parametrize("weights", [[1.0, -0.5], [1.0, float("nan")], [float("inf"), 1.0]])
def test_negative_or_non_finite_weights_raise(weights):
    with pytest.raises(ValueError, match=r"finite and >= 0"):
        dataset_probabilities([10, 30], weights=weights)


def test_weight_count_must_match():
    with pytest.raises(ValueError, match="3 weights for 2 datasets"):
        dataset_probabilities([10, 30], weights=[1, 1, 1])


@pytest.mark.parametrize("mixing", ["bogus", 0, -1.0, True])
def test_unknown_mixing_raises(mixing):
    with pytest.raises(ValueError, match="mixing"):
        dataset_probabilities([10, 30], mixing)


def test_allocate_visits_sums_exactly_with_floor_or_ceil(rng):
    np.testing.assert_array_equal(allocate_visits(10, np.array([1 / 3] * 3)), [4, 3, 3])
    for _ in range(200):
        p = rng.dirichlet(np.ones(int(rng.integers(1, 8))))
        total = int(rng.integers(0, 1000))
        counts = allocate_visits(total, p)
        assert counts.sum() == total
        assert np.all((counts == np.floor(p * total)) | (counts == np.ceil(p * total)))


# ---------------------------------------------------------------------------------- plan
def _plan(keys, *, world=1, rank=0, seed=0, epoch=0, batch=2, steps=3, visits=None, shares=None, interleave=4):
    shares = np.asarray(shares if shares is not None else dataset_probabilities([len(k) for k in keys]))
    visits = visits if visits is not None else sum(len(k) for k in keys)
    return make_plan(keys, shares, visits_per_epoch=visits, batch_size=batch, samples_per_case=steps, seed=seed, epoch=epoch, rank=rank, world_size=world, interleave=interleave)


def _visits(plan) -> list[tuple[int, int]]:
    """Case visits of a plan (each group once, whatever samples_per_case is)."""
    return [tuple(int(v) for v in slot) for group in plan.slots for slot in group]


def test_two_ranks_split_the_cases_disjointly_with_equal_batch_counts():
    keys = [["a"] * 8]
    plans = [_plan(keys, world=2, rank=r) for r in range(2)]
    assert len(plans[0]) == len(plans[1]) == 2 * 3  # 4 groups of 2 cases, 3 batches each
    visits = [set(_visits(p)) for p in plans]
    assert visits[0].isdisjoint(visits[1])
    assert visits[0] | visits[1] == {(0, c) for c in range(8)}
    assert sorted(np.concatenate([p.group_ids for p in plans]).tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize(("num_cases", "world"), [(8, 3), (7, 2), (5, 4), (1, 3)])
def test_uneven_worlds_lose_no_case_and_keep_equal_counts(num_cases, world):
    keys = [["a"] * num_cases]
    plans = [_plan(keys, world=world, rank=r) for r in range(world)]
    assert len({len(p) for p in plans}) == 1 and len(plans[0]) > 0
    seen = set().union(*(_visits(p) for p in plans))
    assert seen == {(0, c) for c in range(num_cases)}


def test_a_batch_never_mixes_keys():
    keys = [["a", "b", "a", "c", "b", "a"], ["b", "c", "c"]]
    for rank in range(2):
        plan = _plan(keys, world=2, rank=rank, batch=3, seed=11)
        for i in range(len(plan)):
            spec = plan.batch(i)
            assert len(spec.cases) == 3
            assert len({keys[d][c] for d, c in spec.cases}) == 1


def test_plans_are_deterministic_and_change_with_epoch_and_seed():
    keys = [[("a",)] * 12, [("a",)] * 5]
    a, b = _plan(keys, seed=4, epoch=2), _plan(keys, seed=4, epoch=2)
    np.testing.assert_array_equal(a.slots, b.slots)
    np.testing.assert_array_equal(a.order, b.order)
    assert not np.array_equal(a.slots, _plan(keys, seed=4, epoch=3).slots)
    assert not np.array_equal(a.slots, _plan(keys, seed=5, epoch=2).slots)


def test_visits_follow_the_shares_and_cycle_over_cases():
    keys = [["a"] * 5, ["a"] * 20]
    plan = _plan(keys, batch=1, steps=1, visits=24, shares=[0.5, 0.5])
    counts = Counter(_visits(plan))
    per_dataset = Counter(d for d, _ in _visits(plan))
    assert per_dataset == {0: 12, 1: 12}
    assert all(counts[(0, c)] in (2, 3) for c in range(5))  # 12 visits over 5 cases
    assert sum(1 for d, _ in counts if d == 1) == 12  # 12 distinct cases of 20, none twice
    assert max(v for (d, _), v in counts.items() if d == 1) == 1


def test_zero_share_dataset_is_never_visited():
    plan = _plan([["a"] * 4, ["a"] * 4], shares=[1.0, 0.0], visits=8)
    assert {d for d, _ in _visits(plan)} == {0}


def test_batches_interleave_groups_step_major():
    plan = _plan([["a"] * 8], batch=2, steps=2, interleave=2)
    assert plan.order.tolist() == [[0, 0], [1, 0], [0, 1], [1, 1], [2, 0], [3, 0], [2, 1], [3, 1]]
    specs = [plan.batch(i) for i in range(len(plan))]
    assert [s.index for s in specs] == list(range(8))
    assert specs[0].cases == specs[2].cases and specs[0].step == 0 and specs[2].step == 1
    assert specs[0].group == plan.group_ids[0]


def test_rank_outside_world_raises():
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        _plan([["a"] * 4], world=2, rank=2)


def _small_plan(keys, shares, visits, batch, epoch=0, world=1, rank=0):
    return make_plan(keys, np.asarray(shares, dtype=float), visits_per_epoch=visits, batch_size=batch, samples_per_case=1, seed=0, epoch=epoch, rank=rank, world_size=world)


def test_every_epoch_has_the_same_length_when_visits_fall_unevenly_on_shapes():
    keys = [["A", "A", "B"]]  # which shape gets the 4 visits changes with the epoch
    lengths = {len(_small_plan(keys, [1.0], 4, 2, epoch=e)) for e in range(12)}
    assert len(lengths) == 1
    for world in (2, 3):
        assert len({len(_small_plan(keys, [1.0], 4, 2, epoch=e, world=world, rank=r)) for e in range(6) for r in range(world)}) == 1


def test_a_short_group_is_filled_with_other_cases_of_its_shape():
    keys = [["A"] * 5]  # 5 visits, batch 3: the second group needs one extra case
    plan = _small_plan(keys, [1.0], 5, 3)
    for slots in plan.slots:
        cases = [tuple(s) for s in slots]
        assert len(set(cases)) == 3  # never the same case twice in a batch
    visited = {tuple(s) for slots in plan.slots for s in slots}
    assert visited == {(0, c) for c in range(5)}


def test_a_lone_shape_repeats_its_case_only_because_no_other_case_shares_it():
    plan = _small_plan([["A", "A", "A", "A", "B"]], [1.0], 5, 2)
    for slots in plan.slots:
        cases = [tuple(s) for s in slots]
        if (0, 4) in cases:
            assert cases == [(0, 4), (0, 4)]
        else:
            assert len(set(cases)) == 2
