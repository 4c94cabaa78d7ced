"""Whole runs in subprocesses: kill and resume, bad input end to end, configuration errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
BASE = ["--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(ROOT / "configs" / "smoke.yaml")]


def overlay(tmp: Path) -> list[str]:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "overlay.yaml"
    path.write_text(
        f"""
trainer:
  logger: false
  default_root_dir: {tmp}
  limit_val_batches: 0
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {tmp}/checkpoints
        save_last: true
        save_top_k: 0
        every_n_train_steps: 2
data:
  output_dir: {tmp}
tive:
  output_dir: {tmp}/tive
  chunk_size: 16
"""
    )
    return ["--config", str(path)]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_tive", "fit", *args]


ENV = {**os.environ, "WANDB_MODE": "disabled"}


def run(args: list[str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command(*args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    if expect_ok:
        assert done.returncode == 0, done.stderr[-5000:]
    return done


def start_and_kill_when(args: list[str], ready, timeout: float = 600) -> None:
    """Start a run, poll until `ready()` holds, then SIGKILL it (no graceful shutdown)."""
    proc = subprocess.Popen(command(*args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "no progress to kill at"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def subset_ids(tmp: Path) -> list[str]:
    return [r["id"] for r in json.loads((tmp / "tive" / "subset.json").read_text())]


def test_killed_valuation_resumes_from_the_last_chunk_with_the_same_subset(tmp_path):
    reference = tmp_path / "uninterrupted"
    run(BASE + overlay(reference))
    killed = tmp_path / "killed"
    args = BASE + overlay(killed)
    done_dir = killed / "tive" / "features" / "done"
    start_and_kill_when(args, lambda: done_dir.is_dir() and len(list(done_dir.iterdir())) >= 3)
    finished_before = len(list(done_dir.iterdir()))
    assert finished_before < 17  # 270 examples in chunks of 16: killed mid-valuation
    assert not (killed / "tive" / "subset.json").exists()
    run(args)
    rank = json.loads((killed / "tive" / "ranks" / "rank-00000.json").read_text())
    assert rank["valued_this_run"] == 270 - 16 * finished_before  # only the unfinished chunks
    assert subset_ids(killed) == subset_ids(reference)


def test_killed_fine_tuning_resumes_from_last_checkpoint_without_new_selection(tmp_path):
    args = BASE + overlay(tmp_path) + ["--trainer.max_epochs", "20", "--trainer.limit_train_batches", "null"]
    last = tmp_path / "checkpoints" / "last.ckpt"

    def mid_training() -> bool:
        try:  # the file may be half-written while we look
            return torch.load(last, map_location="cpu", weights_only=False)["global_step"] >= 2
        except Exception:
            return False

    start_and_kill_when(args, mid_training)
    selected = subset_ids(tmp_path)
    stamp = (tmp_path / "tive" / "tasks.csv").stat().st_mtime_ns
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert 0 < saved["global_step"] < 100
    resumed = run(args + ["--ckpt_path", "last"])
    assert "re-applying the restored selection" in resumed.stderr + resumed.stdout
    assert (tmp_path / "tive" / "tasks.csv").stat().st_mtime_ns == stamp  # no new selection
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == 100  # 20 epochs of 5 batches over the 40 selected examples
    tive_state = next(v for k, v in final["callbacks"].items() if "TIVESelectionCallback" in k)
    ids = [r["id"] for r in json.loads((tmp_path / "tive" / "subset.json").read_text())]
    assert len(tive_state["selected"]) == len(ids) == len(selected)
    id_of = {int(v["index"]): v["id"] for v in csv.DictReader(open(tmp_path / "tive" / "values.csv"))}
    assert [id_of[i] for i in tive_state["selected"]] == selected  # the resumed fit kept the same multiset


def write_pool_with_bad_records(root: Path) -> tuple[Path, list[str]]:
    from lightning_tive.data.demo import DemoConfig, ensure_demo

    demo = ensure_demo(DemoConfig(train_sizes={"color": 40, "text": 20}, val_size=0))
    records = json.loads(Path(demo.train_json).read_text())
    (root / "img").mkdir(parents=True)
    for r in records:
        if "image" in r:
            Image.open(Path(demo.image_folder) / r["image"]).save(root / "img" / Path(r["image"]).name)
            r["image"] = "img/" + Path(r["image"]).name
    valid_ids = [r["id"] for r in records]
    Image.new("RGB", (8, 8)).save(root / "img" / "ok.png")
    (root / "img" / "broken.png").write_bytes(b"not an image")
    bad = [
        {"id": "bad-empty", "conversations": []},
        {"id": "bad-order", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
        {"id": "bad-missing-image", "image": "img/nope.png",
         "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "bad-mark", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "bad-too-long", "image": "img/ok.png",
         "conversations": [{"from": "human", "value": "<image>\n" + "word " * 400}, {"from": "gpt", "value": "a"}]},
    ]
    mixed = records[:10] + bad[:2] + records[10:30] + bad[2:] + records[30:]
    (root / "pool.json").write_text(json.dumps(mixed))
    return root / "pool.json", valid_ids


def data_args(root: Path, pool: Path, policy: str) -> list[str]:
    return ["--data.demo", "null", "--data.train_path", str(pool), "--data.image_folder", str(root),
            "--data.val_ratio", "0.1", "--data.on_bad_record", policy]


def test_bad_records_skipped_end_to_end_lose_no_valid_record(tmp_path):
    pool, valid_ids = write_pool_with_bad_records(tmp_path / "data")
    run(BASE + overlay(tmp_path) + data_args(tmp_path / "data", pool, "skip"))
    skipped = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["id"] for s in skipped) == sorted(
        ["bad-empty", "bad-order", "bad-missing-image", "bad-mark", "bad-too-long"]
    )
    assert all(s["reason"] for s in skipped)
    values = list(csv.DictReader(open(tmp_path / "tive" / "values.csv")))
    summary = json.loads((tmp_path / "tive" / "summary.json").read_text())
    held_out = len(valid_ids) - summary["pool_size"]
    assert 0 < held_out < len(valid_ids) and set(v["id"] for v in values) <= set(valid_ids)
    assert len(values) + held_out == len(valid_ids)  # every valid record is in the pool or held out


def test_bad_record_under_raise_exits_before_training_naming_it(tmp_path):
    pool, _ = write_pool_with_bad_records(tmp_path / "data")
    done = run(BASE + overlay(tmp_path) + data_args(tmp_path / "data", pool, "raise"), expect_ok=False)
    assert done.returncode != 0
    assert "bad record id='bad-empty' at position 10" in done.stderr and "empty conversation" in done.stderr
    assert not (tmp_path / "tive" / "features").exists() and not (tmp_path / "checkpoints").exists()


def test_configuration_error_is_reported_at_parse_time_naming_the_setting(tmp_path):
    done = run(BASE + overlay(tmp_path) + ["--tive.ratio", "1.5"], expect_ok=False)
    assert done.returncode != 0
    assert 'Parser key "tive.ratio"' in done.stderr
    assert "pool:" not in done.stderr  # nothing was loaded
    assert not (tmp_path / "tive").exists()
