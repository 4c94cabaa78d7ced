"""scripts/compare_projectors.py --quick: the JSON line has every field, in sane ranges, and exact values agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

PAIR_KEYS = ("spearman_mean", "spearman_min", "spearman_pooled", "overlap_config", "overlap_topk")


def check_pair(entry: dict) -> None:
    for key in ("spearman_mean", "spearman_min", "spearman_pooled"):
        assert -1.0 <= entry[key] <= 1.0, (key, entry[key])
    assert entry["spearman_min"] <= entry["spearman_mean"] + 1e-12
    for key in ("overlap_config", "overlap_topk"):
        assert 0.0 <= entry[key] <= 1.0, (key, entry[key])
    assert all(v is None or -1.0 <= v <= 1.0 for v in entry["spearman_per_task"].values())


def test_quick_comparison_reports_every_field_in_range(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "scripts/compare_projectors.py", "--quick", "--init-from", "null", "--work", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    final = json.loads(done.stdout.strip().splitlines()[-1])
    assert final["seeds"] == [0, 1, 2] and final["quick"] and final["init_from"] is None
    assert final["pool_size"] == 9 * 12 and final["budget"] == round(0.15 * 9 * 12)
    summary, per_seed = final["summary"], final["per_seed"]
    assert len(per_seed) == 3
    for seed in per_seed:
        check_pair(seed)
        for pair in ("floor", "kronecker_vs_exact", "rademacher_vs_exact"):
            check_pair(seed[pair])
        # Task values and norms are exact (the projector changes neither), so both arms agree bit for bit.
        assert seed["norms_equal"] and seed["task_values_equal"] and seed["task_value_max_rel_diff"] == 0.0
        assert seed["budgets_equal"] and sum(seed["budgets"].values()) == final["budget"]
        for value in seed["reference"].values():
            assert 0.0 <= value <= 1.0
    for key in PAIR_KEYS:
        assert {"mean", "std"} <= set(summary[key]) and summary[key]["std"] >= 0
    assert summary["task_values_equal"] and summary["norms_equal"] and summary["budgets_equal"]
    assert set(summary["spearman_per_task"]) == set(per_seed[0]["spearman_per_task"]) and len(summary["spearman_per_task"]) == 9
    # Every seed's run folders are removed unless --keep.
    assert not any(tmp_path.iterdir())
