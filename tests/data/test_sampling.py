"""The training order: every example served, equal batches per process, length grouping, exact mid-epoch resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from lightning_tive.data.sampling import (
    ResumableDistributedSampler,
    epoch_plan,
    padding_efficiency,
    rank_batches,
)


def lengths_of(n: int, seed: int = 0) -> np.ndarray:
    """Signed lengths: image examples long (positive), a fifth text-only (negative)."""
    rng = np.random.default_rng(seed)
    out = rng.integers(600, 1100, size=n)
    text = rng.random(n) < 0.2
    out[text] = -rng.integers(50, 2048, size=int(text.sum()))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("n", [1, 7, 50, 97])
def test_every_example_is_served_and_every_process_gets_as_many_batches(world, group, n):
    batch = 4
    lengths = lengths_of(n)
    plan = epoch_plan(lengths, batch, world, seed=5, epoch=1, group_by_length=group)
    per_rank = [rank_batches(plan, world, r) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # DDP/FSDP: the same number of steps everywhere
    served = Counter(int(i) for batches in per_rank for b in batches for i in b)
    assert set(served) == set(range(n))
    assert sum(served.values()) - n < world  # padding: fewer repeats than processes
    for batches in per_rank:
        assert all(len(b) == batch for b in batches[:-1]) and 0 < len(batches[-1]) <= batch
    samplers = [ResumableDistributedSampler(list(range(n)), lengths, batch, world, r, seed=5, group_by_length=group)
                for r in range(world)]
    for r, sampler in enumerate(samplers):
        sampler.set_epoch(1)
        assert list(sampler) == [int(i) for b in per_rank[r] for i in b]
        assert len(sampler) == sum(len(b) for b in per_rank[r]) and sampler.num_batches == len(per_rank[r])


def test_the_order_depends_on_seed_and_epoch_only():
    lengths = lengths_of(200)
    one = epoch_plan(lengths, 4, 2, seed=1, epoch=0, group_by_length=True)
    assert all(np.array_equal(a, b) for a, b in zip(one, epoch_plan(lengths, 4, 2, 1, 0, True), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(one, epoch_plan(lengths, 4, 2, 1, 1, True), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(one, epoch_plan(lengths, 4, 2, 2, 0, True), strict=True))


def test_grouped_batches_are_one_modality_and_pad_little():
    lengths = lengths_of(4000, seed=3)
    grouped = epoch_plan(lengths, 8, 4, seed=0, epoch=0, group_by_length=True)
    shuffled = epoch_plan(lengths, 8, 4, seed=0, epoch=0, group_by_length=False)
    mixed = [b for b in grouped if len(set(np.sign(lengths[b]))) > 1]
    assert len(mixed) <= 2  # only the modalities' leftovers share (at most two) batches
    eff = {name: padding_efficiency([b for r in range(4) for b in rank_batches(p, 4, r)], lengths)
           for name, p in (("grouped", grouped), ("shuffled", shuffled))}
    assert eff["grouped"] > 0.97 and eff["shuffled"] < 0.7, eff
    # Under FSDP every step waits for its slowest process: the processes' batches in a step are alike.
    longest = np.array([[np.abs(lengths[b]).max() for b in rank_batches(grouped, 4, r)] for r in range(4)])
    assert np.median(longest.max(axis=0) / longest.min(axis=0)) < 1.05


def test_padding_efficiency_is_real_over_padded_tokens():
    lengths = np.array([10, 5, -20, 20])
    assert padding_efficiency([np.array([0, 1]), np.array([2, 3])], lengths) == pytest.approx((15 + 40) / (20 + 40))
    assert padding_efficiency([], lengths) == 1.0


@pytest.mark.parametrize("world", [1, 2])
def test_a_resumed_epoch_continues_exactly_after_the_batches_done(world):
    lengths = lengths_of(61)
    for rank in range(world):
        full = ResumableDistributedSampler(list(range(61)), lengths, 4, world, rank, seed=9, group_by_length=True)
        full.set_epoch(2)
        order = list(full)
        for done in (0, 1, 5, full.num_batches - 1, full.num_batches):
            resumed = ResumableDistributedSampler(list(range(61)), lengths, 4, world, rank, seed=9, group_by_length=True)
            resumed.resume(2, done)
            resumed.set_epoch(2)  # Lightning sets the epoch again before iterating
            assert list(resumed) == order[done * 4 :]
            assert len(resumed) == len(order)  # the epoch's length stays whole (it sizes the schedule)
            resumed.set_epoch(3)
            assert list(resumed) == [int(i) for b in resumed.batches(3) for i in b]  # later epochs start at 0
