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
from parity import ROOT, assert_same_selection, forget_last_chunks, kill_and_resume, smoke_fit, tive_overlay

pytestmark = pytest.mark.slow

SHARDED = """
  strategy:
    class_path: lightning_tive.sharding.FSDP2Strategy
    init_args:
      replicate_size: {replicas}
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


def run(tmp: Path, devices: int, *extra: str, replicas: int = 1, **fit_options) -> subprocess.CompletedProcess:
    trainer = f"""
trainer:
  devices: {devices}
  logger: false
  default_root_dir: {tmp}{SHARDED.format(replicas=replicas) if devices > 1 else UNSHARDED}"""
    return smoke_fit(tmp, trainer + tive_overlay(tmp), *extra, **fit_options)


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


def test_sharded_checkpoints_keep_trainable_weights_and_export(runs, tmp_path):
    """Each process wrote its own shards (no process gathered the model); export reads the final model's shards."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import LlavaForConditionalGeneration

    _, two, _ = runs
    for name in ("last.ckpt", "final.ckpt"):
        folder = two / "checkpoints" / name
        assert folder.is_dir() and sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    meta = torch.load(two / "checkpoints" / "final.ckpt" / "meta.pt", weights_only=True)
    assert "optimizer_states" not in meta and "optimizer_0" not in str(sorted(meta))
    dcp_to_torch_save(two / "checkpoints" / "final.ckpt", tmp_path / "final.pt")
    state = torch.load(tmp_path / "final.pt", weights_only=True)["state_dict"]
    assert sorted(state) == meta["lightning_tive_trainable"]
    assert not any("tive_reference" in k or "base_layer" in k for k in state)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_tive", "export", "--ckpt_path", str(two), "--output_dir", str(tmp_path / "hf"),
           "--dtype", "float32"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").state_dict()
    for key, value in state.items():
        assert torch.equal(exported[key.removeprefix("model.")], value), key
    assert json.loads((two / "finished.json").read_text())["final_model"] == str(two / "checkpoints" / "final.ckpt")


def test_fit_resumes_from_a_folder_of_shards(runs, tmp_path):
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


def test_hsdp_replicas_select_as_one_process_does(runs, tmp_path):
    """replicate_size 2 on 2 processes: each holds the whole model (a shard group of one), replicas all-reduce."""
    one, _, _ = runs
    run(tmp_path, 2, replicas=2)
    assert_same_selection(one, tmp_path)
    assert (tmp_path / "checkpoints" / "final.ckpt" / "__1_0.distcp").exists()


def test_killed_mid_epoch_and_resumed_from_shards_trains_the_uninterrupted_model(tmp_path):
    """3 epochs of 3 steps under FSDP2; killed as step 5 starts, resumed from step 4's shards: the same
    batches on every process and the same final weights as an uninterrupted fit."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole, killed = kill_and_resume(tmp_path, "{class_path: lightning_tive.sharding.FSDP2Strategy}")
    assert (killed / "checkpoints" / "last.ckpt" / "meta.pt").exists()  # resumed from a folder of shards
    finals = []
    for root in (whole, killed):
        dcp_to_torch_save(root / "checkpoints" / "final.ckpt", root / "final.pt")
        finals.append(torch.load(root / "final.pt", weights_only=True)["state_dict"])
    assert finals[0].keys() == finals[1].keys()
    for name in finals[0]:
        torch.testing.assert_close(finals[1][name], finals[0][name], rtol=0, atol=1e-6, msg=name)
