"""Budgets, sampling inside tasks, and the end-to-end select()."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tive_testutils import brute_instance_values

from lightning_tive.tive.selection import (
    allocate_budgets,
    gumbel_noise,
    sample_within_tasks,
    select,
    total_budget,
)
from lightning_tive.tive.store import FeatureStore

NAMES = ["vqa", "gqa", "ocr", "chat"]


def make_pool(n=400, d=10, seed=0, tasks=4):
    rng = np.random.default_rng(seed)
    tids = rng.integers(0, tasks, n)
    centres = rng.standard_normal((tasks, d)) * 2
    feats = (centres[tids] + rng.standard_normal((n, d))).astype(np.float32)
    norms = rng.uniform(0.1, 1.0, n) * (1 + tids)  # later tasks are "harder"
    return norms, feats, tids


def largest_remainder_brute(total, values):
    """Every way of rounding the quotas up or down that sums to total; pick the documented one."""
    quota = total * np.asarray(values) / np.sum(values)
    base = np.floor(quota).astype(int)
    left = total - base.sum()
    rema = quota - base
    ranked = sorted(range(len(values)), key=lambda i: (-rema[i], i))
    for i in ranked[:left]:
        base[i] += 1
    return base


def test_total_budget_rounds_half_to_even_and_validates_ratio():
    assert total_budget(5, 0.5) == 2  # 2.5 -> 2
    assert total_budget(7, 0.5) == 4  # 3.5 -> 4
    assert total_budget(665000, 0.15) == 99750
    assert total_budget(10, 1) == 10
    for bad in (0, -0.1, 1.01, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="ratio must be in"):
            total_budget(10, bad)


@pytest.mark.parametrize(
    "total, values",
    [
        (10, [1.0, 1.0, 1.0]),
        (100, [0.3, 1.7, 2.2, 0.01]),
        (7, [5.0, 5.0, 5.0, 5.0]),
        (99750, [2.5, 1.0, 3.3]),
    ],
)
def test_budgets_sum_exactly_and_follow_largest_remainder(total, values):
    budgets = allocate_budgets(total, values, NAMES[: len(values)])
    assert budgets.sum() == total
    np.testing.assert_array_equal(budgets, largest_remainder_brute(total, values))
    quota = total * np.asarray(values) / np.sum(values)
    assert (np.abs(budgets - quota) < 1).all()


def test_equal_remainders_go_to_earlier_tasks():
    np.testing.assert_array_equal(allocate_budgets(7, [1.0] * 4, NAMES), [2, 2, 2, 1])


def test_excluded_and_degenerate_tasks_get_nothing(caplog):
    budgets = allocate_budgets(30, [1.0, 2.0, 3.0, 4.0], NAMES, exclude_tasks=["chat"])
    assert budgets[3] == 0 and budgets.sum() == 30
    np.testing.assert_array_equal(budgets, [5, 10, 15, 0])
    budgets = allocate_budgets(12, [1.0, 0.0, np.nan, 2.0], NAMES)
    assert "['gqa', 'ocr'] get no budget" in caplog.text
    np.testing.assert_array_equal(budgets, [4, 0, 0, 8])
    budgets = allocate_budgets(12, [1.0, 1.0, 1.0, 1.0], NAMES, finite_counts=[0, 3, 3, 3])
    assert "['vqa'] get no budget" in caplog.text
    np.testing.assert_array_equal(budgets, [0, 4, 4, 4])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['textcaps'\]"):
        allocate_budgets(12, [1.0] * 4, NAMES, exclude_tasks=["textcaps"])
    with pytest.raises(ValueError, match="no task can receive budget"):
        allocate_budgets(12, [1.0] * 4, NAMES, exclude_tasks=NAMES)


def test_topk_and_vanishing_temperature_pick_the_highest_values():
    rng = np.random.default_rng(0)
    u = rng.uniform(-1, 1, 50)
    tids = np.repeat([0, 1], 25)
    finite = np.ones(50, bool)
    budgets = np.array([7, 3])
    top = sample_within_tasks(u, tids, budgets, finite, "topk")
    for t, b in enumerate(budgets):
        members = np.flatnonzero(tids == t)
        expected = members[np.argsort(-u[members])[:b]]
        assert set(np.flatnonzero(top * (tids == t))) == set(expected)
    cold = sample_within_tasks(u, tids, budgets, finite, "softmax", temperature=1e-9, seed=3)
    np.testing.assert_array_equal(cold, top)


def test_topk_ties_break_by_pool_index():
    times = sample_within_tasks(np.zeros(6), np.zeros(6, int), np.array([2]), np.ones(6, bool), "topk")
    assert times.tolist() == [1, 1, 0, 0, 0, 0]


def test_uniform_ignores_values_and_follows_the_noise():
    u = np.linspace(-1, 1, 20)
    times = sample_within_tasks(u, np.zeros(20, int), np.array([5]), np.ones(20, bool), "uniform", seed=4)
    expected = np.argsort(-gumbel_noise(20, 4))[:5]
    assert set(np.flatnonzero(times)) == set(expected)
    hot = sample_within_tasks(u, np.zeros(20, int), np.array([5]), np.ones(20, bool), "softmax", 1e12, seed=4)
    np.testing.assert_array_equal(hot, times)


def test_softmax_draw_probabilities_follow_exp_u_over_temperature():
    # Drawing 1 of {a, b}: P(a) = 1 / (1 + exp((u_b - u_a) / T)). 4000 seeds: std of the frequency < 0.008.
    u, temperature, trials = np.array([0.5, -0.3]), 0.4, 4000
    hits = sum(
        sample_within_tasks(u, np.zeros(2, int), np.array([1]), np.ones(2, bool), "softmax", temperature, s)[
            0
        ]
        for s in range(trials)
    )
    p = 1 / (1 + math.exp((u[1] - u[0]) / temperature))
    assert abs(hits / trials - p) < 4 * math.sqrt(p * (1 - p) / trials)


def test_oversampling_repeats_whole_task_then_draws_the_rest():
    u = np.array([0.1, 0.9, 0.5, 0.2, 0.7])
    finite = np.array([True, True, True, False, True])  # example 3 is never picked
    times = sample_within_tasks(u, np.zeros(5, int), np.array([10]), finite, "topk")
    # 4 finite examples: each twice (8), then the top 2 of the rest by u: 1 (0.9) and 4 (0.7)
    assert times.tolist() == [2, 3, 2, 0, 3]


def test_sampling_is_seeded():
    u = np.random.default_rng(1).uniform(-1, 1, 100)
    args = (u, np.zeros(100, int), np.array([30]), np.ones(100, bool), "softmax", 0.5)
    np.testing.assert_array_equal(sample_within_tasks(*args, seed=5), sample_within_tasks(*args, seed=5))
    assert not np.array_equal(sample_within_tasks(*args, seed=5), sample_within_tasks(*args, seed=6))


def test_sampling_settings_are_validated():
    args = (np.zeros(3), np.zeros(3, int), np.array([1]), np.ones(3, bool))
    with pytest.raises(ValueError, match="sampling='greedy'"):
        sample_within_tasks(*args, "greedy")
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            sample_within_tasks(*args, "softmax", bad)


def test_select_end_to_end_and_its_table(tmp_path):
    norms, feats, tids = make_pool()
    norms[3] = np.nan
    result = select(norms, feats, tids, NAMES, ratio=0.3, exclude_tasks=["vqa"], sampling="softmax", seed=1)
    assert result.budget == 120 and len(result.selected_indices) == 120
    assert np.all(np.diff(result.selected_indices) >= 0)
    np.testing.assert_array_equal(np.bincount(result.selected_indices, minlength=400), result.times_selected)
    table = {row["task"]: row for row in result.task_table()}
    assert table["vqa"]["budget"] == 0 and table["vqa"]["selected"] == 0
    assert sum(row["budget"] for row in table.values()) == 120
    assert all(row["selected"] == row["budget"] for row in table.values())
    assert sum(row["proportion"] for row in table.values()) == pytest.approx(1.0)
    assert table["vqa"]["task_value"] == pytest.approx(np.nanmean(norms[tids == 0]))
    assert result.times_selected[3] == 0 and np.isnan(result.instance_values[3]) and not result.finite[3]

    store = FeatureStore(tmp_path, 400, 10, chunk_size=64)
    f16 = feats.astype(np.float16)
    for c in store.missing_chunks():
        a, b = store.chunk_range(c)
        store.write_chunk(c, np.arange(a, b), f16[a:b], norms[a:b])
    from_store = select(
        store.read_norms(), store, tids, NAMES, 0.3, ["vqa"], "softmax", 1.0, 1, block_rows=100
    )
    from_array = select(norms, f16, tids, NAMES, 0.3, ["vqa"], "softmax", 1.0, 1)
    np.testing.assert_array_equal(from_store.selected_indices, from_array.selected_indices)
    np.testing.assert_array_equal(from_store.instance_values, from_array.instance_values)

    with pytest.raises(ValueError, match="unknown task"):
        select(norms, feats, tids, NAMES, exclude_tasks=["VQA"])
    with pytest.raises(ValueError, match="ratio"):
        select(norms, feats, tids, NAMES, ratio=0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 60),
    n_tasks=st.integers(1, 5),
    ratio=st.floats(0.01, 1.0),
    sampling=st.sampled_from(["softmax", "topk", "uniform"]),
    temperature=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_selection_invariants(n, n_tasks, ratio, sampling, temperature, seed, data):
    rng = np.random.default_rng(seed % 1000)
    tids = rng.integers(0, n_tasks, n)
    feats = rng.standard_normal((n, 3)).astype(np.float32)
    norms = rng.uniform(0.0, 2.0, n)
    bad = data.draw(st.lists(st.integers(0, n - 1), max_size=n // 3))
    norms[bad] = np.nan
    names = [f"t{i}" for i in range(n_tasks)]
    exclude = data.draw(st.lists(st.sampled_from(names), max_size=n_tasks - 1, unique=True))
    args = (norms, feats, tids, names, ratio, exclude, sampling, temperature, seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = select(*args)
    except ValueError as err:
        # Legitimate only when no task can take budget.
        assert "no task can receive budget" in str(err)
        finite_tasks = {t for t in np.unique(tids[np.isfinite(norms)]) if names[t] not in exclude}
        assert not any(np.nanmean(norms[(tids == t)]) > 0 for t in finite_tasks)
        return
    budget = round(ratio * n)
    assert result.budget == budget and len(result.selected_indices) == budget
    per_task = np.bincount(tids, weights=result.times_selected, minlength=n_tasks)
    for t, row in enumerate(result.tasks):
        assert per_task[t] == row.budget == row.selected
        if names[t] in exclude:
            assert row.budget == 0
        members = np.flatnonzero((tids == t) & result.finite)
        if row.budget:
            copies = result.times_selected[members]
            assert copies.max() <= math.ceil(row.budget / members.size)
            assert copies.min() >= row.budget // members.size
    assert sum(row.budget for row in result.tasks) == budget
    assert (result.times_selected[~result.finite] == 0).all()
    assert np.isnan(result.instance_values[~result.finite]).all()
    ref = brute_instance_values(feats, tids, np.isfinite(norms))
    np.testing.assert_allclose(result.instance_values, ref, rtol=0, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        again = select(*args)
    np.testing.assert_array_equal(again.selected_indices, result.selected_indices)
