"""The smoke select-then-train under DDP with 2 CPU processes (gloo), against a 1-process run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from parity import (
    DRIVER,
    assert_same_selection,
    forget_last_chunks,
    kill_and_resume,
    resumable,
    smoke_fit,
    tive_overlay,
)

pytestmark = pytest.mark.slow


def run(tmp: Path, devices: int, extra: str = "", chunk_size: int = 32, **fit_options) -> subprocess.CompletedProcess:
    # validation on: every process computes every task's metric (a collective) whatever it saw
    trainer = f"""
trainer:
  devices: {devices}
  strategy: {"ddp" if devices > 1 else "auto"}
  logger: false
  enable_checkpointing: false
  callbacks: []
  default_root_dir: {tmp}
  limit_val_batches: 3"""
    more = []
    if extra:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "extra.yaml").write_text(extra)
        more = ["--config", str(tmp / "extra.yaml")]
    return smoke_fit(tmp, trainer + tive_overlay(tmp, chunk_size), *more, **fit_options)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one = tmp_path_factory.mktemp("one")
    two = tmp_path_factory.mktemp("two")
    run(one, 1)
    run(two, 2)
    return one, two


def test_every_pool_index_valued_exactly_once_in_per_rank_shards(runs):
    _, two = runs
    folder = two / "tive" / "features"
    spec = json.loads((folder / "shards.json").read_text())
    assert spec["world_size"] == 2 and len(spec["shards"]) == 2
    shards = [np.load(folder / name / "indices.npy") for name in spec["shards"]]
    assert all(len(s) for s in shards)
    together = np.concatenate(shards)
    assert sorted(together.tolist()) == list(range(spec["pool_size"]))
    for name, indices in zip(spec["shards"], shards, strict=True):
        features = np.load(folder / name / "features.npy")
        assert features.shape[0] == len(indices)


def test_ranks_agree_on_adapter_and_selection(runs):
    _, two = runs
    ranks = [json.loads(p.read_text()) for p in sorted((two / "tive" / "ranks").glob("rank-*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len({r["reference_adapter_sha256"] for r in ranks}) == 1 and ranks[0]["reference_adapter_sha256"]
    assert len({r["selection_sha256"] for r in ranks}) == 1
    assert sum(r["valued_this_run"] for r in ranks) == json.loads((two / "tive" / "summary.json").read_text())["pool_size"]


def test_two_processes_match_one_process(runs):
    one, two = runs
    assert_same_selection(one, two)


def test_resumed_two_process_run_continues_from_its_shards(runs):
    _, two = runs
    before = json.loads((two / "tive" / "summary.json").read_text())
    removed = forget_last_chunks(two)
    run(two, 2)
    ranks = [json.loads(p.read_text()) for p in sorted((two / "tive" / "ranks").glob("rank-*.json"))]
    assert sum(r["valued_this_run"] for r in ranks) == removed
    after = json.loads((two / "tive" / "summary.json").read_text())
    assert after["tasks"] == before["tasks"]


def test_shards_are_balanced_by_examples_and_tokens(runs):
    """The 270-example smoke pool over 2 processes: 135 examples each, tokens within one example's length."""
    _, two = runs
    folder = two / "tive" / "features"
    spec = json.loads((folder / "shards.json").read_text())
    shards = [np.load(folder / name / "indices.npy") for name in spec["shards"]]
    assert [len(s) for s in shards] == [135, 135]
    tokens = [np.load(folder / name / "tokens.npy") for name in spec["shards"]]  # supervised tokens, a proxy
    assert abs(tokens[0].sum() - tokens[1].sum()) <= 0.05 * tokens[0].sum()
    summary = json.loads((two / "tive" / "summary.json").read_text())
    assert summary["padding_efficiency"]["valuation"] > 0.95  # length-sorted valuation batches


def test_a_straggling_process_does_not_time_out_the_others(tmp_path):
    """Process 1 starts valuing 8 s late while the collective timeout is 3 s: the others wait without a collective."""
    done = run(tmp_path, 2, extra="tive:\n  stop_after_selection: true\n", entry=("tests/e2e/driver.py",),
               env={"LIGHTNING_TIVE_TEST_STRAGGLER_S": "8"}, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (tmp_path / "tive" / "subset.json").exists()


def test_three_processes_on_a_two_example_pool(tmp_path):
    """One process has no example to value: it still takes part in every collective."""
    tiny_pool = """
data:
  demo:
    train_sizes: {color: 1, text: 1}
    val_size: 2
tive:
  ratio: 1.0
  warmup_ratio: 1.0
  chunk_size: 1
"""
    run(tmp_path, 3, extra=tiny_pool)
    folder = tmp_path / "tive" / "features"
    spec = json.loads((folder / "shards.json").read_text())
    together = sorted(np.concatenate([np.load(folder / name / "indices.npy") for name in spec["shards"]]).tolist())
    assert together == [0, 1]
    assert [len(np.load(folder / name / "indices.npy")) for name in spec["shards"]] == [1, 1, 0]
    assert len(json.loads((tmp_path / "tive" / "subset.json").read_text())) == 2


def test_killed_mid_epoch_and_resumed_on_two_processes_sees_what_an_uninterrupted_fit_sees(tmp_path):
    """3 epochs of 3 steps; killed as step 5 starts (epoch 2), resumed from step 4's checkpoint."""
    _, killed = kill_and_resume(tmp_path, "ddp")
    # A process that cannot see the checkpoint stops them all at once, named, instead of diverging or hanging.
    hidden = smoke_fit(killed, resumable(killed, "ddp"), "--ckpt_path", str(killed / "checkpoints" / "last.ckpt"), entry=DRIVER,
                       env={"LIGHTNING_TIVE_TEST_HIDE_CHECKPOINT": "1"}, check=False)
    assert hidden.returncode != 0 and "not visible to process(es) [1]" in hidden.stderr
