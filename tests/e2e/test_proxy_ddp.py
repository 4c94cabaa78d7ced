"""A proxy reference model under DDP with 2 CPU processes (gloo): the same selection as one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from parity import ROOT, assert_same_selection, smoke_fit, tive_overlay

pytestmark = pytest.mark.slow


def run(tmp: Path, devices: int) -> None:
    trainer = f"""
trainer:
  devices: {devices}
  strategy: {"ddp" if devices > 1 else "auto"}
  logger: false
  enable_checkpointing: false
  callbacks: []
  default_root_dir: {tmp}
  limit_val_batches: 0
  limit_train_batches: 2"""
    smoke_fit(tmp, trainer + tive_overlay(tmp), "--config", str(ROOT / "configs" / "demo_proxy.yaml"),
              "--trainer.default_root_dir", str(tmp))


def test_two_processes_value_with_the_proxy_as_one_does(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, 1)
    run(two, 2)
    assert_same_selection(one, two)
    for folder in (one, two):
        summary = json.loads((folder / "tive" / "summary.json").read_text())
        assert summary["settings"]["reference_model"]["tiny"]["hidden_size"] == 64
    assert (two / "tive" / "features").is_dir() and len(list((two / "tive" / "features").glob("rank*"))) == 2
