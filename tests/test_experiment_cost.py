"""The cost/quality table's measures against brute force, its proxy setting, and a quick cost run end to end."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lightning_tive.experiment.cost import (
    agreement,
    read_selection,
    shallow_reference,
    tive_overrides,
    top_overlap,
    top_overlap_chance,
)
from lightning_tive.experiment.protocol import PRESETS
from lightning_tive.proxy import check_reference_model
from lightning_tive.report import write_tasks_csv, write_values_csv

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("a", "b", "c")


def write_selection(folder: Path, rng: np.random.Generator, task: np.ndarray, budgets: dict) -> dict:
    """A TIVE output folder written by the real writers: random values, budgets, and a drawn multiset."""
    folder.mkdir(parents=True)
    values = rng.normal(size=len(task))
    values[rng.integers(len(task))] = np.nan  # a non-finite gradient
    chosen = np.concatenate([rng.choice(np.flatnonzero(task == t), size=b, replace=True) for t, b in budgets.items()])
    times = np.bincount(chosen, minlength=len(task))
    write_values_csv(folder / "values.csv", [f"id{i}" for i in range(len(task))], list(task), np.abs(values), values, times)
    write_tasks_csv(folder / "tasks.csv", [
        {"task": t, "size": int((task == t).sum()), "task_value": 1.0, "proportion": 0.1, "budget": b, "selected": b}
        for t, b in budgets.items()
    ])
    return {"values": values, "chosen": chosen, "budgets": budgets}


def brute_spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of ranks (no ties in continuous draws)."""
    return float(np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1])


def brute_top(values: np.ndarray, task: np.ndarray, name: str, k: int) -> set[int]:
    """The task's k highest values (non-finite last, ties to the lower index), by sorting tuples."""
    ranked = sorted((v if np.isfinite(v) else -np.inf, -i, i) for i, v in enumerate(values) if task[i] == name)
    return {i for _, _, i in ranked[::-1][:k]}


def test_agreement_matches_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    task = np.array([TASKS[i % 3] for i in range(60)])
    full = write_selection(tmp_path / "full", rng, task, {"a": 5, "b": 3, "c": 2})
    mine = write_selection(tmp_path / "mine", rng, task, {"a": 2, "b": 6, "c": 2})
    got = agreement(read_selection(tmp_path / "mine"), read_selection(tmp_path / "full"))
    rhos = []
    for t in TASKS:
        rows = (task == t) & np.isfinite(mine["values"]) & np.isfinite(full["values"])
        rhos.append(brute_spearman(mine["values"][rows], full["values"][rows]))
    common = Counter(mine["chosen"].tolist()) & Counter(full["chosen"].tolist())
    assert got["spearman"] == pytest.approx(np.mean(rhos), abs=1e-12)
    assert got["budget_l1"] == pytest.approx((3 + 3 + 0) / 10)
    assert got["overlap"] == pytest.approx(sum(common.values()) / 10)
    same = agreement(read_selection(tmp_path / "full"), read_selection(tmp_path / "full"))
    assert same == {"spearman": pytest.approx(1.0), "budget_l1": 0.0, "overlap": 1.0, "top_overlap": 1.0}


def test_top_overlap_matches_brute_force_and_its_chance_level(tmp_path):
    rng = np.random.default_rng(2)
    task = np.array([TASKS[i % 3] for i in range(90)])
    budgets = {"a": 7, "b": 3, "c": 0}
    full = write_selection(tmp_path / "full", rng, task, budgets)
    mine = write_selection(tmp_path / "mine", rng, task, {"a": 1, "b": 9, "c": 2})
    shared = sum(len(brute_top(mine["values"], task, t, k) & brute_top(full["values"], task, t, k))
                 for t, k in budgets.items())
    got = top_overlap(read_selection(tmp_path / "mine"), read_selection(tmp_path / "full"))
    assert got == pytest.approx(shared / 10)
    # values drawn at random: the mean over many draws approaches the stated chance level
    selection = read_selection(tmp_path / "full")
    draws = [top_overlap({**selection, "value": rng.normal(size=90)}, selection) for _ in range(3000)]
    assert np.mean(draws) == pytest.approx(top_overlap_chance(selection), abs=0.01)
    assert top_overlap_chance(selection) == pytest.approx((7 * 7 / 30 + 3 * 3 / 30) / 10)


def test_selections_over_other_pools_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    write_selection(tmp_path / "x", rng, np.array(["a"] * 6), {"a": 2})
    write_selection(tmp_path / "y", rng, np.array(["a"] * 7), {"a": 2})
    with pytest.raises(ValueError, match="different pools"):
        agreement(read_selection(tmp_path / "x"), read_selection(tmp_path / "y"))


@pytest.mark.parametrize("preset", ["cost", "cost_smollm2"])
def test_a_proxy_setting_is_the_main_models_own_config_cut_and_started_from_stage_1(preset, tmp_path):
    args = argparse.Namespace(preset=PRESETS[preset], model_overrides={"language_model": "/somewhere"})
    ckpt = tmp_path / "stage1.ckpt"
    cheap = tive_overrides(PRESETS[preset].settings["tive_cheap"], args, ckpt)
    reference = cheap.pop("reference_model")
    assert reference == shallow_reference(args, ckpt, PRESETS[preset].settings["tive_cheap"]["reference_layers"])
    assert reference["init_from"] == str(ckpt) and "optimizer" not in reference and "lr_scheduler" not in reference
    assert reference["language_model_layers"] >= 1 and "reference_layers" not in cheap
    check_reference_model(reference)  # every key is a model argument
    if preset == "cost_smollm2":
        assert reference["language_model"] == "/somewhere"


@pytest.mark.slow
def test_quick_cost_run_writes_the_table_from_its_own_folders(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_tive", "experiment", "--preset", "cost", "--quick", "--work", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    table = json.loads((tmp_path / "cost.json").read_text())
    rows = {row["arm"]: row for row in table["rows"]}
    assert set(rows) == {"random", "tive", "length_normalised", *PRESETS["cost"].settings}
    runs = {r["name"]: r for r in json.loads((tmp_path / "runs.json").read_text())["runs"]}
    epoch_s = runs["full"]["seconds"]["training_s"]  # --quick trains one epoch
    for name in ("tive", "tive_proxy", "tive_cheap"):
        seconds = runs[name]["seconds"]
        assert rows[name]["valuation_per_epoch"][0] == pytest.approx(seconds["valuation_s"] / epoch_s)
        assert rows[name]["total_per_full"][0] == pytest.approx(sum(seconds.values()) / epoch_s)
    full = read_selection(tmp_path / "seed0" / "tive" / "tive")
    for name in ("tive_proxy", "tive_cheap", "random"):
        expected = agreement(read_selection(tmp_path / "seed0" / name / "tive"), full)
        assert rows[name]["overlap"][0] == pytest.approx(expected["overlap"])
    overlay = (tmp_path / "seed0" / "tive_cheap" / "overlay.yaml").read_text()
    assert '"language_model_layers": 1' in overlay and str(tmp_path / "stage1" / "checkpoints" / "stage1.ckpt") in overlay
    summary = json.loads((tmp_path / "seed0" / "tive_proxy" / "tive" / "summary.json").read_text())
    assert "language_model_layers" in json.dumps(summary)  # the proxy is named in the run's own summary
    assert rows["tive"]["minus_tive"] is None and rows["tive_proxy"]["minus_tive"]["per_seed"] == [
        rows["tive_proxy"]["relative"][0] - rows["tive"]["relative"][0]]
    # --rewrite makes the same files from the saved runs, running nothing
    before = (tmp_path / "cost.json").read_text()
    (tmp_path / "cost.json").unlink()
    again = subprocess.run([sys.executable, "-m", "lightning_tive", "experiment", "--preset", "cost", "--rewrite",
                            "--work", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (tmp_path / "cost.json").read_text() == before and not (tmp_path / "seed1").exists()
    md = (tmp_path / "cost.md").read_text()
    assert "| tive_cheap |" in md and (tmp_path / "cost.png").stat().st_size > 0 and (tmp_path / "cost_arms.md").exists()
