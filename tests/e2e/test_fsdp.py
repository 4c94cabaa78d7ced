"""The smoke select-then-train sharded with FSDP2 (ModelParallelStrategy), 2 CPU processes (gloo), against 1 process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from parity import ROOT, assert_same_selection, forget_last_chunks, smoke_fit, tive_overlay

pytestmark = pytest.mark.slow

SHARDED = """
  strategy:
    class_path: lightning.pytorch.strategies.ModelParallelStrategy
    init_args:
      data_parallel_size: 2
      tensor_parallel_size: 1
      save_distributed_checkpoint: false
  limit_val_batches: 2
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        save_last: true
        save_top_k: 0
"""
UNSHARDED = """
  strategy: auto
  enable_checkpointing: false
  callbacks: []
  limit_val_batches: 0
"""


def run(tmp: Path, devices: int, *extra: str) -> subprocess.CompletedProcess:
    trainer = f"""
trainer:
  devices: {devices}
  logger: false
  default_root_dir: {tmp}{SHARDED if devices > 1 else UNSHARDED}"""
    return smoke_fit(tmp, trainer + tive_overlay(tmp), *extra)


def ranks(tmp: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp / "tive" / "ranks").glob("rank-*.json"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one = tmp_path_factory.mktemp("one")
    two = tmp_path_factory.mktemp("fsdp")
    run(one, 1)
    done = run(two, 2)
    return one, two, done


def test_sharded_selection_matches_one_process(runs):
    one, two, _ = runs
    assert_same_selection(one, two)


def test_both_processes_valued_their_shards_with_one_adapter_and_trained(runs):
    _, two, _ = runs
    records = ranks(two)
    assert [r["rank"] for r in records] == [0, 1]
    assert len({r["reference_adapter_sha256"] for r in records}) == 1 and records[0]["reference_adapter_sha256"]
    assert len({r["selection_sha256"] for r in records}) == 1
    assert sum(r["valued_this_run"] for r in records) == json.loads((two / "tive" / "summary.json").read_text())["pool_size"]
    assert json.loads((two / "finished.json").read_text())["global_step"] >= 2


def test_checkpoint_keeps_trainable_weights_and_exports(runs, tmp_path):
    _, two, _ = runs
    ckpt = two / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    assert sorted(state) == checkpoint["lightning_tive_trainable"]
    assert not any("tive_reference" in k or "base_layer" in k for k in state)
    assert all(not hasattr(v, "device_mesh") for v in state.values())  # whole tensors, not shards
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_tive", "export", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "hf")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from transformers import LlavaForConditionalGeneration

    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").state_dict()
    for key, value in state.items():
        assert torch.equal(exported[key.removeprefix("model.")], value), key


def test_fit_resumes_from_a_sharded_checkpoint(runs, tmp_path):
    _, two, _ = runs
    copy = tmp_path / "resumed"
    shutil.copytree(two, copy)
    before = json.loads((copy / "finished.json").read_text())["global_step"]
    done = run(copy, 2, "--trainer.max_epochs", "2", "--ckpt_path", str(copy / "checkpoints" / "last.ckpt"))
    log = done.stdout + done.stderr
    assert "re-applying the restored selection" in log and "TIVE warm-up" not in log
    assert json.loads((copy / "finished.json").read_text())["global_step"] == 2 * before


def test_resumed_sharded_valuation_continues_from_its_shards(runs):
    _, two, _ = runs
    before = json.loads((two / "tive" / "summary.json").read_text())
    adapter = ranks(two)[0]["reference_adapter_sha256"]
    removed = forget_last_chunks(two)
    done = run(two, 2)
    assert "resuming valuation with the reference adapter" in done.stdout + done.stderr
    records = ranks(two)
    assert sum(r["valued_this_run"] for r in records) == removed
    assert {r["reference_adapter_sha256"] for r in records} == {adapter}
    after = json.loads((two / "tive" / "summary.json").read_text())
    assert after["tasks"] == before["tasks"]
