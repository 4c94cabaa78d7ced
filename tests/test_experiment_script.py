"""`python -m lightning_tive experiment --quick` (and scripts/experiment.py, the same command): every arm built
through the CLI, the files and the paired statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_quick_experiment_runs_every_arm_and_writes_the_results(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lightning_tive", "experiment", "--quick", "--work", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    final = json.loads(done.stdout.strip().splitlines()[-1])
    results = json.loads((tmp_path / "results.json").read_text())
    arms = results["arms"]
    assert set(arms) == {"full", "random", "tive", "tive_uniform", "instance_only", "gradnorm", "length", "perplexity",
                         "size_aware", "length_normalised", "random_equal_steps", "tive_equal_steps", "size_aware_equal_steps"}
    pool = 9 * 12
    assert arms["full"]["train_examples"] == pool and arms["full"]["relative"] == [100.0]
    assert all(arms[a]["train_examples"] == round(0.15 * pool) for a in arms if a != "full")
    # equal compute: as many optimizer steps as the full-data arm, on the subset
    assert {arms[a]["steps"] for a in arms if a.endswith("_equal_steps")} == {arms["full"]["steps"]}
    assert arms["tive"]["steps"] < arms["full"]["steps"]
    # paired differences are the per-seed differences of the relative scores
    assert arms["tive"]["minus_random"]["per_seed"] == [arms["tive"]["relative"][0] - arms["random"]["relative"][0]]
    assert arms["tive_equal_steps"]["minus_random"]["against"] == "random_equal_steps"
    assert "minus_random" not in arms["full"] and "minus_random" not in arms["random"]
    # arms that re-select from tive's features carry its warm-up cost, and did no warm-up of their own
    assert arms["gradnorm"]["seconds"]["warmup_s"] == arms["tive"]["seconds"]["warmup_s"] > 0
    assert not (tmp_path / "seed0" / "gradnorm" / "tive" / "features").exists()
    assert final["tive"] == round(arms["tive"]["relative"][0], 2)
    md = (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 0 and "## Results" in md
    assert "`python -m lightning_tive experiment --quick --work" in md  # the command that produced it


def test_the_script_is_the_package_command():
    done = subprocess.run([sys.executable, "scripts/experiment.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.startswith("usage: python -m lightning_tive experiment") and "--preset" in done.stdout


def test_smollm2_quick_experiment_runs_full_random_and_tive_from_its_stage1(tmp_path, smollm2_gguf):
    """`--preset smollm2 --quick`: SmolLM2 stage 1 once, then full / random / tive, results_smollm2.*."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "scripts/experiment.py", "--preset", "smollm2", "--quick", "--threads", "1", "--work", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    final = json.loads(done.stdout.strip().splitlines()[-1])
    results = json.loads((tmp_path / "results_smollm2.json").read_text())
    assert not (tmp_path / "results.json").exists()
    arms, protocol = results["arms"], results["protocol"]
    assert set(arms) == {"full", "random", "tive"}  # no equal-compute arms in this preset
    assert protocol["preset"] == "smollm2" and protocol["config"] == "configs/smollm2.yaml"
    assert protocol["stage1"] == "configs/smollm2_stage1.yaml" and protocol["stage1_align"] == 16
    pool = 9 * 3
    tasks = ("color", "shape", "count", "spatial", "choice", "caption", "ocr", "text", "conversation")
    assert protocol["mixture"] == {"train_sizes": {t: 3 for t in tasks}, "val_size": 2}
    assert arms["full"]["train_examples"] == pool and arms["full"]["relative"] == [100.0]
    assert arms["random"]["train_examples"] == arms["tive"]["train_examples"] == round(0.15 * pool)
    assert arms["tive"]["seconds"]["valuation_s"] > 0 and arms["random"]["seconds"]["valuation_s"] == 0
    assert arms["tive"]["minus_random"]["per_seed"] == [arms["tive"]["relative"][0] - arms["random"]["relative"][0]]
    # every arm started from the one stage-1 checkpoint, built on the fetched GGUF
    assert (tmp_path / "stage1" / "checkpoints" / "stage1.ckpt").is_file()
    assert final["tive"] == round(arms["tive"]["relative"][0], 2) and "tive - random" in final
    md = (tmp_path / "results_smollm2.md").read_text()
    assert "## Results" in md and "--preset smollm2" in md and (tmp_path / "results_smollm2.png").stat().st_size > 0
