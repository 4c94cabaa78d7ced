"""The CLI surface: --print_config round-trips, and validate runs from a fit checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "WANDB_MODE": "disabled"}
pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_tive", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_print_config_round_trips(tmp_path):
    first = cli("fit", "--config", "configs/demo.yaml", "--print_config")
    assert first.returncode == 0, first.stderr[-3000:]
    config = yaml.safe_load(first.stdout)
    assert config["tive"]["ratio"] == 0.15 and config["tive"]["strategy"] == "tive"
    assert config["model"]["finetune"] == "full" and config["data"]["demo"] is not None
    (tmp_path / "printed.yaml").write_text(first.stdout)
    second = cli("fit", "--config", str(tmp_path / "printed.yaml"), "--print_config")
    assert second.returncode == 0, second.stderr[-3000:]
    assert yaml.safe_load(second.stdout) == config


def test_fit_then_validate_from_its_checkpoint(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(
        f"""
trainer:
  logger: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp_path}/ckpt, save_last: true, save_top_k: 0}}
data: {{output_dir: {tmp_path}}}
tive: {{output_dir: {tmp_path}/tive}}
"""
    )
    common = ["--config", "configs/demo.yaml", "--config", "configs/smoke.yaml", "--config", str(overlay)]
    fit = cli("fit", *common)
    assert fit.returncode == 0, fit.stderr[-3000:]
    validate = cli("validate", *common, "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"))
    assert validate.returncode == 0, validate.stderr[-3000:]
    # the printed table: avg_accuracy is the mean of the per-task accuracies beside it
    table = dict(re.findall(r"│\s*(val/\S+)\s*│\s*([-0-9.e]+)\s*│", validate.stdout))
    accuracies = [float(v) for k, v in table.items() if k.endswith("/accuracy")]
    assert len(accuracies) >= 5
    assert abs(float(table["val/avg_accuracy"]) - sum(accuracies) / len(accuracies)) < 1e-6
