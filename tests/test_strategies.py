"""Selection strategies beside TIVE: its two ablations and the baselines, as callback options."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from fit_helpers import POOL, run_fit

from lightning_tive.phases import ReferencePhases
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
    monkeypatch.setattr(ReferencePhases, "run", lambda *a, **k: pytest.fail("valuation ran"))
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
    assert [r.budget for r in by_value.tasks] == [1, 5, 0]  # 6 x (1, 9, 1)/11, largest remainder, ties to the earlier
    top = select_top_scores(np.arange(12.0), norms, u, finite, tids, ["a", "b", "c"], ratio=0.25)
    assert top.selected_indices.tolist() == [9, 10, 11]
    with pytest.raises(ValueError, match="budget_by"):
        select_from_values(norms, u, finite, tids, ["a", "b", "c"], budget_by="tasks")


def test_value_size_budgets_and_task_scores_on_arrays():
    tids = np.array([0] * 16 + [1] * 4)
    norms = np.array([1.0] * 16 + [2.0] * 4)
    u, finite = np.zeros(20), np.ones(20, dtype=bool)
    # v = (1, 2), |T| = (16, 4): v * |T|^0.5 = (4, 4) -> an even split of B = 10
    sized = select_from_values(norms, u, finite, tids, ["a", "b"], ratio=0.5, sampling="uniform", budget_by="value_size")
    assert [r.budget for r in sized.tasks] == [5, 5] and sized.settings["size_alpha"] == 0.5
    plain = select_from_values(norms, u, finite, tids, ["a", "b"], ratio=0.5, sampling="uniform")
    assert [r.budget for r in plain.tasks] == [3, 7]  # 10 x (1, 2)/3
    # task scores replace the norms as what the task value averages; the norms are still reported
    tokens = np.array([4.0] * 16 + [1.0] * 4)
    scored = select_from_values(norms, u, finite, tids, ["a", "b"], ratio=0.5, sampling="uniform",
                                task_scores=norms * np.sqrt(tokens))
    assert [r.task_value for r in scored.tasks] == [2.0, 2.0] and [r.budget for r in scored.tasks] == [5, 5]
    np.testing.assert_array_equal(scored.grad_norms, norms)


def stored(tmp, name):
    from lightning_tive.tive.store import FeatureStore

    return FeatureStore.open(tmp / "tive" / "features").read_column(name)


def test_perplexity_takes_the_highest_reference_losses(tive_run, tmp_path):
    _, tive, _, _ = run_fit(tmp_path, strategy="perplexity", features_from=str(tive_run / "tive" / "features"),
                            stop_after_selection=True)
    loss = stored(tive_run, "loss")
    assert np.isfinite(loss).all() and loss.min() > 0
    expected = np.sort(np.argsort(-loss, kind="stable")[: round(0.25 * POOL)])
    assert tive.selected.tolist() == expected.tolist()


def test_stored_tokens_are_each_examples_supervised_tokens(tive_run, processor):
    from fit_helpers import BATCH, DEMO

    from lightning_tive.data.datamodule import LlavaDataModule

    dm = LlavaDataModule(demo=DEMO, batch_size=BATCH, max_length=256)
    dm.attach_processor(processor)
    dm.setup("fit")
    expected = [int((dm._dataset[i]["labels"][1:] != -100).sum()) for i in range(POOL)]
    assert stored(tive_run, "tokens").tolist() == expected


def test_size_aware_and_length_normalised_change_only_the_task_budgets(tive_run, tmp_path):
    features = str(tive_run / "tive" / "features")
    run_fit(tmp_path / "size", strategy="size_aware", size_alpha=1.0, features_from=features, stop_after_selection=True)
    run_fit(tmp_path / "len", strategy="length_normalised", features_from=features, stop_after_selection=True)
    tive_rows, size_rows, len_rows = rows(tive_run), rows(tmp_path / "size"), rows(tmp_path / "len")
    names = sorted(tive_rows)
    # size_aware with alpha = 1: budget proportional to v(T) * |T|, i.e. to each task's sum of norms
    shares = [float(tive_rows[n]["task_value"]) * int(tive_rows[n]["size"]) for n in names]
    expected = allocate_budgets(round(0.25 * POOL), shares, names)
    assert [int(size_rows[n]["budget"]) for n in names] == expected.tolist()
    # length_normalised: v(T) is the task mean of ||g|| * sqrt(tokens)
    norms = np.array([float(v["grad_norm"]) for v in values(tive_run)])
    tasks = [v["task"] for v in values(tive_run)]
    tokens = stored(tive_run, "tokens")
    for n in names:
        member = np.array([t == n for t in tasks])
        np.testing.assert_allclose(float(len_rows[n]["task_value"]), (norms[member] * np.sqrt(tokens[member])).mean(), rtol=1e-5)
