"""The smoke select-then-train under DDP with 2 CPU processes (gloo), against a 1-process run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from parity import assert_same_selection, forget_last_chunks, smoke_fit, tive_overlay

pytestmark = pytest.mark.slow


def run(tmp: Path, devices: int, extra: str = "", chunk_size: int = 32) -> subprocess.CompletedProcess:
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
    return smoke_fit(tmp, trainer + tive_overlay(tmp, chunk_size), *more)


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


def test_a_process_without_a_chunk_of_the_pool_takes_part_in_every_step(tmp_path):
    """2 processes, chunks of 1,024 over the 270-example smoke pool: the second values nothing."""
    run(tmp_path, 2, chunk_size=1024)
    folder = tmp_path / "tive" / "features"
    spec = json.loads((folder / "shards.json").read_text())
    sizes = [len(np.load(folder / name / "indices.npy")) for name in spec["shards"]]
    assert sizes == [270, 0]
    ranks = [json.loads(p.read_text()) for p in sorted((tmp_path / "tive" / "ranks").glob("rank-*.json"))]
    assert [r["valued_this_run"] for r in ranks] == [270, 0] and len({r["selection_sha256"] for r in ranks}) == 1
    assert len(json.loads((tmp_path / "tive" / "subset.json").read_text())) == round(0.15 * 270)


def test_three_processes_on_a_five_example_pool(tmp_path):
    tiny_pool = """
data:
  demo:
    train_sizes: {color: 2, shape: 2, text: 1}
    val_size: 2
tive:
  ratio: 0.6
  warmup_ratio: 1.0
  chunk_size: 1
"""
    run(tmp_path, 3, extra=tiny_pool)
    folder = tmp_path / "tive" / "features"
    spec = json.loads((folder / "shards.json").read_text())
    together = sorted(np.concatenate([np.load(folder / name / "indices.npy") for name in spec["shards"]]).tolist())
    assert together == [0, 1, 2, 3, 4]
    assert len(json.loads((tmp_path / "tive" / "subset.json").read_text())) == 3
