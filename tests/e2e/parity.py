"""The multi-process smoke fit and the check that its selection is the one-process one, shared by the DDP and FSDP tests."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


CHUNK_SIZE = 32


def tive_overlay(tmp: Path, chunk_size: int = CHUNK_SIZE) -> str:
    """The `data:` and `tive:` sections of a smoke run into `tmp`, with a small reference LoRA."""
    return f"""
data:
  output_dir: {tmp}
tive:
  output_dir: {tmp}/tive
  chunk_size: {chunk_size}
  warmup_batch_size: 8
  reference_lora:
    r: 8
    alpha: 16
    dropout: 0.0
    target_modules: [q_proj, k_proj, v_proj, o_proj]
"""


def smoke_fit(
    tmp: Path, overlay: str, *extra: str, entry: tuple[str, ...] = ("-m", "lightning_tive"), env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """`fit` of configs/demo.yaml + smoke.yaml + `overlay` (written to `tmp`) in a subprocess; asserts it succeeds
    unless `check` is off. `entry` is what runs `fit` (a module, or a script that patches it first)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "overlay.yaml").write_text(overlay)
    cmd = [
        sys.executable, *entry, "fit",
        "--config", str(ROOT / "configs" / "demo.yaml"),
        "--config", str(ROOT / "configs" / "smoke.yaml"),
        "--config", str(tmp / "overlay.yaml"), *extra,
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def values(tmp: Path) -> dict[int, dict]:
    """values.csv rows by pool index."""
    return {int(r["index"]): r for r in csv.DictReader(open(tmp / "tive" / "values.csv"))}


def assert_same_selection(one: Path, many: Path, atol: float = 1e-4, min_overlap: float = 0.99) -> float:
    """Equal task budgets, instance values within `atol`, subsets overlapping at least `min_overlap`."""
    budgets = [{r["task"]: int(r["budget"]) for r in csv.DictReader(open(run / "tive" / "tasks.csv"))} for run in (one, many)]
    assert budgets[0] == budgets[1]
    v1, v2 = values(one), values(many)
    assert v1.keys() == v2.keys()
    u1 = np.array([float(v1[i]["instance_value"]) for i in sorted(v1)])
    u2 = np.array([float(v2[i]["instance_value"]) for i in sorted(v2)])
    np.testing.assert_allclose(u1, u2, atol=atol)
    s1, s2 = (Counter(r["id"] for r in json.loads((run / "tive" / "subset.json").read_text())) for run in (one, many))
    overlap = sum((s1 & s2).values()) / sum(s1.values())
    assert overlap >= min_overlap, overlap
    return overlap


def forget_last_chunks(run: Path, chunk_size: int = CHUNK_SIZE) -> int:
    """Unmark the last finished chunk of every shard, as if every process were killed mid-valuation
    (a killed run never marks its folder finished); returns how many rows need valuing again."""
    folder = run / "tive" / "features"
    (run / "finished.json").unlink()
    removed = 0
    for name in json.loads((folder / "shards.json").read_text())["shards"]:
        markers = sorted((folder / name / "done").iterdir())
        markers[-1].unlink()
        removed += len(np.load(folder / name / "indices.npy")) - chunk_size * (len(markers) - 1)
    return removed


def seen_batches(folder: Path) -> dict[int, dict[int, list[int]]]:
    """{rank: {global step: pool indices}} as tests/e2e/driver.py recorded them (LIGHTNING_TIVE_TEST_SEEN)."""
    out: dict[int, dict[int, list[int]]] = {}
    for rank in (0, 1):
        for line in (folder / f"seen-rank-{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            assert entry["sampler"] == "ResumableDistributedSampler", entry["sampler"]  # Lightning left it in place
            out.setdefault(rank, {})[entry["step"]] = entry["pool_index"]
    return out


RESUMABLE = """
trainer:
  devices: 2
  logger: false
  default_root_dir: {root}
  strategy: {strategy}
  max_epochs: 3
  limit_train_batches: null
  limit_val_batches: 0
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        save_last: true
        save_top_k: 0
        every_n_train_steps: 2
data:
  group_by_length: true
tive:
  strategy: random
"""
DRIVER = ("tests/e2e/driver.py",)


def resumable(root: Path, strategy: str) -> str:
    """RESUMABLE for a run folder and a `trainer.strategy` value (YAML)."""
    return RESUMABLE.replace("{root}", str(root)).replace("{strategy}", strategy)
KILL_AT, RESUME_AT = 5, 4  # 3 epochs of 3 steps: killed as step 5 starts (epoch 2), resumed from step 4's checkpoint


def kill_and_resume(tmp: Path, strategy: str) -> tuple[Path, Path]:
    """An uninterrupted 2-process fit, and one killed mid-epoch then resumed from its last checkpoint; returns
    both run folders after checking that every process trained the same batches in both."""
    whole, killed = tmp / "whole", tmp / "killed"
    for root in (whole, killed):
        (root / "seen").mkdir(parents=True)
    smoke_fit(whole, resumable(whole, strategy), entry=DRIVER, env={"LIGHTNING_TIVE_TEST_SEEN": str(whole / "seen")})
    done = smoke_fit(killed, resumable(killed, strategy), entry=DRIVER, check=False,
                     env={"LIGHTNING_TIVE_TEST_SEEN": str(killed / "seen"), "LIGHTNING_TIVE_TEST_KILL_AT": str(KILL_AT)})
    assert done.returncode != 0 and not (killed / "finished.json").exists()
    before = seen_batches(killed / "seen")
    for rank in (0, 1):
        (killed / "seen" / f"seen-rank-{rank}.jsonl").unlink()
    smoke_fit(killed, resumable(killed, strategy), "--ckpt_path", str(killed / "checkpoints" / "last.ckpt"),
              entry=DRIVER, env={"LIGHTNING_TIVE_TEST_SEEN": str(killed / "seen")})
    after, expected = seen_batches(killed / "seen"), seen_batches(whole / "seen")
    assert min(after[0]) == RESUME_AT and len(expected[0]) == 9
    for rank in (0, 1):
        assert {**{s: b for s, b in before[rank].items() if s < RESUME_AT}, **after[rank]} == expected[rank]
    assert expected[0] != expected[1]  # each process its own share
    return whole, killed
