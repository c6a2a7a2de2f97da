"""Resuming a stream: the batch after a restore is the one an uninterrupted run would deliver."""

from __future__ import annotations

import itertools

import pytest

from tests.data.conftest import assert_batches_equal, make_stream


def _run(stream, count: int) -> list[dict]:
    """``count`` batches, continuing into new epochs as a training loop does."""
    out = []
    while len(out) < count:
        before = len(out)
        for batch in stream:
            out.append(batch)
            if len(out) == count:
                break
        assert len(out) > before, "an epoch yielded nothing"
    return out


@pytest.fixture(scope="module")
def reference(uniform_store):
    """Three uninterrupted epochs (8 batches each) of the uniform store."""
    return _run(make_stream(uniform_store), 24)


@pytest.mark.parametrize("consumed", [1, 5, 7, 8, 13])
def test_resume_continues_with_the_next_batch(uniform_store, reference, consumed):
    first = make_stream(uniform_store)
    head = _run(first, consumed)
    for a, b in zip(head, reference):
        assert_batches_equal(a, b)
    state = first.state_dict()
    assert (state["epoch"], state["next_batch"]) == divmod(consumed, 8)

    resumed = make_stream(uniform_store, num_threads=2)
    resumed.load_state_dict(state)
    tail = _run(resumed, 24 - consumed)
    for a, b in zip(tail, reference[consumed:]):
        assert_batches_equal(a, b)


def test_resume_through_worker_processes(uniform_store, reference):
    """Workers split the remaining batches; the loader must still deliver them in order."""
    first = make_stream(uniform_store)
    loader = first.loader(num_workers=2)
    taken = list(itertools.islice(loader, 3))
    assert [[b["stream"]["epoch"][0], b["stream"]["index"][0]] for b in taken] == [[0, 0], [0, 1], [0, 2]]
    state = first.state_dict()
    assert (state["epoch"], state["next_batch"]) == (0, 3)

    resumed = make_stream(uniform_store)
    resumed.load_state_dict(state)
    rest = list(resumed.loader(num_workers=2))
    assert [[b["stream"]["epoch"][0], b["stream"]["index"][0]] for b in rest] == [[0, i] for i in range(3, 8)]
    for a, b in zip(rest, reference[3:8]):
        assert_batches_equal(a, b)
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["next_batch"] == 0


def test_state_survives_a_torch_checkpoint_round_trip(uniform_store, reference, tmp_path):
    import torch

    stream = make_stream(uniform_store)
    _run(stream, 10)
    torch.save({"stream": stream.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["stream"]
    resumed = make_stream(uniform_store)
    resumed.load_state_dict(state)
    assert_batches_equal(next(iter(resumed)), reference[10])


def test_a_different_seed_refuses_to_resume(uniform_store):
    state = make_stream(uniform_store, seed=3).state_dict()
    other = make_stream(uniform_store, seed=4)
    with pytest.raises(ValueError, match="seed 3, this one 4"):
        other.load_state_dict(state)
    assert other.state_dict()["next_batch"] == 0


@pytest.mark.parametrize(
    "change",
    [{"batch_size": 4}, {"samples_per_case": 3}, {"rank": 0, "world_size": 2}, {"patch_size": 12}, {"intensity": "percentile"}],
)
def test_changed_settings_refuse_to_resume(uniform_store, change):
    source = make_stream(uniform_store)
    _run(source, 3)
    state = source.state_dict()
    other = make_stream(uniform_store, **change)
    with pytest.raises(ValueError, match=r"resume with the same (data )?settings"):
        other.load_state_dict(state)
    # a refused state leaves the stream where it was
    assert (other.state_dict()["epoch"], other.state_dict()["next_batch"]) == (0, 0)
