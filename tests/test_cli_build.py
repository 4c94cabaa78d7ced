"""The CLI's set-up, in process: torch threads, and the run folder's derived paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_tive.callback import TIVESelectionCallback
from lightning_tive.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_torch_threads_and_run_folder_paths_are_applied(tmp_path):
    before = torch.get_num_threads()
    try:
        cli = run_cli(["--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(ROOT / "configs" / "smoke.yaml"),
                       "--trainer.default_root_dir", str(tmp_path), "--torch_threads", "1"], run=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    tive = next(c for c in cli.trainer.callbacks if isinstance(c, TIVESelectionCallback))
    assert tive.config.output_dir == str(tmp_path / "tive") and tive.config.ratio == 0.15
    assert cli.datamodule.output_dir == str(tmp_path)
    checkpoint = cli.trainer.checkpoint_callback
    assert checkpoint.dirpath == str(tmp_path / "checkpoints")
    assert Path(cli.trainer.logger.save_dir) == tmp_path


SEVEN_B = {
    "full": (["llava15_7b.yaml"], "FSDP2Strategy", 8, 1, 16, 1),
    "full_2node": (["llava15_7b.yaml", "llava15_7b_2node.yaml"], "FSDP2Strategy", 8, 2, 8, 1),
    "lora": (["llava15_7b.yaml", "llava15_7b_lora.yaml"], "ddp", 8, 1, 16, 1),
    "qlora": (["llava15_7b.yaml", "llava15_7b_qlora.yaml"], "auto", 1, 1, 4, 32),
}


@pytest.mark.parametrize("name", sorted(SEVEN_B))
def test_7b_configs_parse_and_keep_llavas_global_batch_of_128(name):
    """The documented 7B command lines resolve (without building anything) to a global batch of 128."""
    import subprocess
    import sys

    import yaml

    files, strategy, devices, nodes, batch, accumulate = SEVEN_B[name]
    args = [a for f in files for a in ("--config", str(ROOT / "configs" / f))]
    done = subprocess.run([sys.executable, "-m", "lightning_tive", "fit", *args, "--print_config"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = yaml.safe_load(done.stdout)
    trainer = cfg["trainer"]
    shown = trainer["strategy"]["class_path"] if isinstance(trainer["strategy"], dict) else trainer["strategy"]
    assert shown.endswith(strategy)
    assert (trainer["devices"], trainer["num_nodes"], cfg["data"]["batch_size"], trainer["accumulate_grad_batches"]) == (
        devices, nodes, batch, accumulate)
    assert devices * nodes * batch * accumulate == 128
    assert trainer["logger"]["init_args"]["offline"] is True
    if name == "full_2node":
        assert trainer["strategy"]["init_args"]["replicate_size"] == 2
