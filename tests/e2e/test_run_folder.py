"""One run folder: every output of a run lands under trainer.default_root_dir, and a finished run is not overwritten."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def fit(cwd: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lightning_tive", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
           "--config", str(ROOT / "configs" / "smoke.yaml"), "--trainer.default_root_dir", str(root),
           "--trainer.enable_progress_bar", "false", *extra]
    # PYTHONWARNINGS=ignore: the run folder's notices must reach the user even with warnings filtered out.
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_every_output_lands_under_the_run_folder_and_a_finished_run_is_kept(tmp_path):
    cwd, root = tmp_path / "elsewhere", tmp_path / "x"
    cwd.mkdir()
    done = fit(cwd, root)
    assert done.returncode == 0, done.stderr[-4000:]
    assert list(cwd.iterdir()) == []  # nothing in the working directory
    for path in ("config.yaml", "finished.json", "checkpoints/last.ckpt", "tive/summary.json", "tive/subset.json",
                 "tive/features/meta.json"):
        assert (root / path).is_file(), path
    assert list((root / "wandb").glob("offline-run-*/run-*.wandb"))
    config = yaml.safe_load((root / "config.yaml").read_text())
    assert config["data"]["output_dir"] == str(root)  # skipped.jsonl goes here
    assert config["tive"]["output_dir"] == str(root / "tive")
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == str(root)
    assert config["trainer"]["callbacks"][0]["init_args"]["dirpath"] == str(root / "checkpoints")
    # the same folder again: refused before anything is written, naming the ways forward
    watched = ("finished.json", "checkpoints/last.ckpt", "tive/summary.json", "tive/subset.json")
    stamps = {path: (root / path).stat().st_mtime_ns for path in watched}
    again = fit(cwd, root)
    assert again.returncode != 0
    assert "already holds a finished run" in again.stderr and "--overwrite true" in again.stderr
    assert f"--ckpt_path {root / 'checkpoints' / 'last.ckpt'}" in again.stderr
    assert {path: (root / path).stat().st_mtime_ns for path in watched} == stamps
    replaced = fit(cwd, root, "--overwrite", "true")
    assert replaced.returncode == 0, replaced.stderr[-4000:]
    assert "replacing the finished run" in replaced.stderr
    assert (root / "finished.json").stat().st_mtime_ns > stamps["finished.json"]
    # a run that never finished (no finished.json): trained over, with a notice naming how to continue it
    (root / "finished.json").unlink()
    restarted = fit(cwd, root, "--tive.enabled", "false", "--trainer.max_steps", "1")
    assert restarted.returncode == 0, restarted.stderr[-4000:]
    assert "holds an unfinished run" in restarted.stderr
    assert f"--ckpt_path {root / 'checkpoints' / 'last.ckpt'}" in restarted.stderr
