"""Numerical faults and edge cases through the whole select-then-train, on the tiny model."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch
from fit_helpers import run_fit

from lightning_tive.data.demo import DemoConfig
from lightning_tive.model import LlavaModule


def read(tmp, name):
    path = tmp / "tive" / name
    return json.loads(path.read_text()) if name.endswith(".json") else list(csv.DictReader(open(path)))


@pytest.fixture
def poison(monkeypatch):
    """Make chosen pool indices' losses NaN during valuation only."""
    from lightning_tive.phases import ReferencePhases

    bad: set[int] = set()
    valuing: list[bool] = []
    original, value = LlavaModule.per_example_loss, ReferencePhases.value

    def valuation(self, *args, **kwargs):
        valuing.append(True)
        try:
            return value(self, *args, **kwargs)
        finally:
            valuing.pop()

    def per_example_loss(self, batch):
        loss = original(self, batch)
        if not valuing or not bad:
            return loss
        hit = torch.tensor([int(i) in bad for i in batch["pool_index"]], device=loss.device)
        # row-local, like an overflow: NaN forward and NaN backward for the hit examples only
        return loss * torch.where(hit, torch.full_like(loss, float("nan")), torch.ones_like(loss))

    monkeypatch.setattr(LlavaModule, "per_example_loss", per_example_loss)
    monkeypatch.setattr(ReferencePhases, "value", valuation)
    return bad


def test_non_finite_examples_are_flagged_counted_excluded_and_never_selected(tmp_path, poison, caplog):
    demo = DemoConfig(train_sizes={"color": 20, "shape": 12, "caption": 6}, val_size=2)
    # pool order is the file's: color 0-19, shape 20-31, caption 32-37
    poison.update({32, 33, 34, 35, 36, 37, 7, 25})  # all of caption, one color, one shape
    _, tive, _, dm = run_fit(tmp_path, demo=demo, ratio=0.5, stop_after_selection=True)
    assert [dm.pool_record(i)["task"] for i in (0, 20, 32)] == ["color", "shape", "caption"]
    values = read(tmp_path, "values.csv")
    flagged = {int(v["index"]) for v in values if v["grad_norm"] == "nan"}
    assert flagged == poison
    assert all(v["instance_value"] == "nan" and v["times_selected"] == "0" for v in values if int(v["index"]) in poison)
    assert read(tmp_path, "summary.json")["non_finite_examples"] == len(poison)
    assert not set(tive.selected.tolist()) & poison
    tasks = {r["task"]: r for r in read(tmp_path, "tasks.csv")}
    assert int(tasks["caption"]["budget"]) == 0  # no finite example: no budget, share redistributed
    assert sum(int(r["budget"]) for r in tasks.values()) == round(0.5 * 38)
    color_norms = [float(v["grad_norm"]) for v in values if v["task"] == "color" and int(v["index"]) not in poison]
    assert float(tasks["color"]["task_value"]) == pytest.approx(np.mean(color_norms), rel=1e-6)
    assert any("caption" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


EDGE_CASES = {
    "one_example_task": (DemoConfig(train_sizes={"color": 20, "text": 1, "shape": 10}, val_size=1), {}),
    "task_missing_from_warm_up": (
        DemoConfig(train_sizes={"color": 20, "shape": 10, "count": 6, "text": 6}, val_size=1),
        {"warmup_ratio": 0.05},
    ),
    "budget_at_pool_size_oversamples": (
        DemoConfig(train_sizes={"color": 20, "caption": 3, "text": 8}, val_size=1),
        {"ratio": 1.0},
    ),
    "fewer_budget_than_tasks": (
        DemoConfig(train_sizes={"color": 10, "shape": 10, "count": 10, "text": 10, "caption": 10}, val_size=1),
        {"ratio": 0.05},
    ),
    "warm_up_is_the_whole_pool": (DemoConfig(train_sizes={"color": 10, "text": 6}, val_size=1), {"warmup_ratio": 1.0}),
    "all_text_only": (DemoConfig(train_sizes={"text": 24}, val_size=2), {}),
    "image_only": (DemoConfig(train_sizes={"color": 12, "shape": 12}, val_size=2), {}),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases_select_exactly_the_budget_and_train(tmp_path, case):
    demo, settings = EDGE_CASES[case]
    pool = sum(demo.train_sizes.values())
    settings = {"ratio": 0.25, **settings}
    trainer, tive, probe, dm = run_fit(tmp_path, demo=demo, **settings)
    budget = round(settings["ratio"] * pool)
    tasks = read(tmp_path, "tasks.csv")
    assert len(tive.selected) == budget == sum(int(r["budget"]) for r in tasks)
    assert all(int(r["selected"]) == int(r["budget"]) for r in tasks)
    assert Counter(probe.seen) == Counter(tive.selected.tolist())  # and it trained on exactly that
    for row in tasks:
        members = [i for i in range(pool) if dm.task_names[dm.pool_task_ids[i]] == row["task"]]
        copies = [int(np.sum(tive.selected == i)) for i in members]
        if int(row["budget"]):
            assert max(copies) <= -(-int(row["budget"]) // len(members))
    if case == "budget_at_pool_size_oversamples":
        assert max(Counter(tive.selected.tolist()).values()) > 1  # a high-value task is repeated
    if case == "task_missing_from_warm_up":
        from lightning_tive.tive.warmup import balanced_warmup_indices

        warm = balanced_warmup_indices(dm.pool_task_ids, len(dm.task_names), round(0.05 * pool), tive.config.seed)
        assert len(set(dm.pool_task_ids[warm].tolist())) < len(dm.task_names)  # some task really was left out
        assert read(tmp_path, "summary.json")["non_finite_examples"] == 0
