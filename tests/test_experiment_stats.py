"""lightning_tive.experiment.stats against brute force: ranks, Spearman, t-intervals, overlaps, the arms' summary."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest

from lightning_tive.experiment.stats import (
    interval,
    json_safe,
    overlap,
    ranks,
    relative,
    spearman,
    summarise_arms,
    uniform_overlap,
)


def test_ranks_give_ties_their_average_rank():
    assert ranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]


def test_spearman_is_pearson_of_ranks_and_nan_when_undefined():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.normal(size=40)  # ties on one side
    want = np.corrcoef(ranks(a), ranks(b))[0, 1]
    assert spearman(a, b) == pytest.approx(want, abs=1e-12)
    assert spearman(b, np.exp(b)) == pytest.approx(1.0) and spearman(b, -b) == pytest.approx(-1.0)
    assert math.isnan(spearman(np.ones(5), b[:5])) and math.isnan(spearman(b[:1], b[:1]))


def test_interval_is_the_student_t_interval_of_paired_differences():
    mean, low, high = interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # sd 1, 2 degrees of freedom
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    mean, low, high = interval([0.5])
    assert mean == 0.5 and math.isnan(low) and math.isnan(high)


def selection(times: list[int], budgets: list[int], finite: list[bool] | None = None) -> SimpleNamespace:
    times_arr = np.asarray(times)
    return SimpleNamespace(
        times_selected=times_arr, budget=int(sum(budgets)), tasks=[SimpleNamespace(budget=b) for b in budgets],
        finite=np.ones(len(times), dtype=bool) if finite is None else np.asarray(finite),
    )


def test_overlap_counts_repeated_picks_as_a_multiset():
    a, b = selection([2, 1, 0, 0], [3]), selection([1, 0, 2, 0], [3])
    assert overlap(a, b) == pytest.approx(1 / 3)
    assert overlap(a, a) == 1.0


@pytest.mark.parametrize("size, budget", [(4, 2), (4, 6), (5, 5), (3, 0)])
def test_uniform_overlap_is_the_expected_overlap_of_two_uniform_draws(size, budget):
    # A draw of `budget` from `size` examples: every example budget // size times, plus a uniform subset of the rest.
    reps, rest = divmod(budget, size)
    subsets = [np.bincount(list(s), minlength=size) + reps for s in itertools.combinations(range(size), rest)]
    brute = np.mean([np.minimum(x, y).sum() for x in subsets for y in subsets]) / max(budget, 1)
    task_ids = np.zeros(size + 1, dtype=int)  # one more example, not finite: not drawn from
    result = selection([0] * (size + 1), [budget], finite=[True] * size + [False])
    assert uniform_overlap(result, task_ids) == pytest.approx(brute)


def test_json_safe_nulls_non_finite_numbers_and_rounds_on_request():
    value = {"a": [1.23456789, float("nan")], "b": {"c": float("inf")}, "d": 3}
    assert json_safe(value) == {"a": [1.23456789, None], "b": {"c": None}, "d": 3}
    assert json_safe(value, digits=3) == {"a": [1.235, None], "b": {"c": None}, "d": 3}


def run(arm: str, seed: int, accuracy: float, name: str | None = None) -> dict:
    return {"arm": arm, "name": name or arm, "seed": seed, "metrics": {"val/color/accuracy": accuracy, "val/loss": 1.0},
            "seconds": {"warmup_s": 0.0, "training_s": 2.0}, "train_examples": 10, "steps": 4}


def test_arms_are_scored_relative_to_full_and_paired_with_random_on_each_seed():
    runs = [run("full", 0, 0.5), run("full", 1, 0.4), run("random", 0, 0.25), run("random", 1, 0.4),
            run("tive", 0, 0.5), run("tive", 1, 0.2)]
    arms = summarise_arms(runs)
    assert arms["random"]["relative"] == [50.0, 100.0] and arms["tive"]["relative"] == [100.0, 50.0]
    assert arms["tive"]["minus_random"]["per_seed"] == [50.0, -50.0]
    assert arms["tive"]["minus_random"]["mean"] == 0.0 and arms["tive"]["minus_random"]["against"] == "random"
    assert "minus_random" not in arms["full"] and "minus_random" not in arms["random"]
    assert relative({"a": 1.0, "b": 0.3}, {"a": 2.0, "b": 0.0}) == 50.0  # a task full scores 0 on is left out
