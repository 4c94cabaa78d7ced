"""Selection strategies beside TIVE: its two ablations and the baselines, as callback options."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from test_callback import POOL, run_fit

from lightning_tive.callback import TIVESelectionCallback
from lightning_tive.tive.selection import allocate_budgets, select_from_values, select_top_scores


def rows(tmp):
    return {r["task"]: r for r in csv.DictReader(open(tmp / "tive" / "tasks.csv"))}


def values(tmp):
    return list(csv.DictReader(open(tmp / "tive" / "values.csv")))


def size_budgets(tmp, ratio=0.25):
    table = rows(tmp)
    names = sorted(table)
    expected = allocate_budgets(round(ratio * POOL), [int(table[n]["size"]) for n in names], names)
    return {n: int(b) for n, b in zip(names, expected, strict=True)}


@pytest.fixture(scope="module")
def tive_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tive_strategy")
    run_fit(tmp, stop_after_selection=True)
    return tmp


def test_random_needs_no_gradients_and_splits_by_task_size(tmp_path, monkeypatch):
    monkeypatch.setattr(TIVESelectionCallback, "_warm_up_and_value", lambda *a, **k: pytest.fail("valuation ran"))
    _, tive, _, _ = run_fit(tmp_path, strategy="random", stop_after_selection=True)
    table = rows(tmp_path)
    assert {n: int(r["budget"]) for n, r in table.items()} == size_budgets(tmp_path)
    assert len(tive.selected) == round(0.25 * POOL) and len(set(tive.selected.tolist())) == len(tive.selected)
    assert all(v["grad_norm"] == "nan" for v in values(tmp_path))
    _, again, _, _ = run_fit(tmp_path / "again", strategy="random", stop_after_selection=True)
    _, other, _, _ = run_fit(tmp_path / "other", strategy="random", seed=4, stop_after_selection=True)
    assert again.selected.tolist() == tive.selected.tolist() != other.selected.tolist()


def test_length_takes_the_longest_responses(tmp_path):
    _, tive, _, dm = run_fit(tmp_path, strategy="length", stop_after_selection=True)
    words = [
        sum(len(t["value"].split()) for t in dm.pool_record(i)["conversations"] if t["from"] == "gpt")
        for i in range(POOL)
    ]
    chosen = set(tive.selected.tolist())
    assert min(words[i] for i in chosen) >= max(words[i] for i in range(POOL) if i not in chosen)


def test_gradnorm_takes_the_largest_gradient_norms(tive_run, tmp_path):
    _, tive, _, _ = run_fit(tmp_path, strategy="gradnorm", features_from=str(tive_run / "tive" / "features"),
                            stop_after_selection=True)
    norms = np.array([float(v["grad_norm"]) for v in values(tmp_path)])
    expected = np.sort(np.argsort(-norms, kind="stable")[: round(0.25 * POOL)])
    assert tive.selected.tolist() == expected.tolist()


def test_ablations_share_one_half_of_tive_each(tive_run, tmp_path):
    features = str(tive_run / "tive" / "features")
    run_fit(tmp_path / "uniform", strategy="tive_uniform", features_from=features, stop_after_selection=True)
    run_fit(tmp_path / "instance", strategy="instance_only", features_from=features, stop_after_selection=True)
    tive_budgets = {n: r["budget"] for n, r in rows(tive_run).items()}
    assert {n: r["budget"] for n, r in rows(tmp_path / "uniform").items()} == tive_budgets  # task values kept
    instance = {n: int(r["budget"]) for n, r in rows(tmp_path / "instance").items()}
    assert instance == size_budgets(tmp_path / "instance")  # task shares by size instead


def test_budget_by_size_and_top_scores_on_arrays():
    tids = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
    norms = np.array([1.0] * 4 + [9.0] * 2 + [1.0] * 6)
    u = np.zeros(12)
    finite = np.ones(12, dtype=bool)
    by_value = select_from_values(norms, u, finite, tids, ["a", "b", "c"], ratio=0.5, sampling="uniform")
    by_size = select_from_values(norms, u, finite, tids, ["a", "b", "c"], ratio=0.5, sampling="uniform", budget_by="size")
    assert [r.budget for r in by_size.tasks] == [2, 1, 3]
    assert [r.budget for r in by_value.tasks][1] > 1  # the high-norm task gets more than its size share
    top = select_top_scores(np.arange(12.0), norms, u, finite, tids, ["a", "b", "c"], ratio=0.25)
    assert top.selected_indices.tolist() == [9, 10, 11]
    with pytest.raises(ValueError, match="budget_by"):
        select_from_values(norms, u, finite, tids, ["a", "b", "c"], budget_by="tasks")
